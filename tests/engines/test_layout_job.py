"""Layout mode in the batch job: layout → blocks → prompts → Markdown, exactly once per page."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import job_options, page_states, settle, wait_for_ok_pages

from ocrbatch.engines.local import run_job

options = partial(job_options, max_tokens=12, dpi=110, layout="cdla")

SAMPLE_DOCS = Path(__file__).parents[2] / "sample_docs"



@pytest.fixture(scope="module")
def cdla_run(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cdla")
    out = folder / "out.parquet"
    for name in ("purchase-order-table.pdf", "two-column-article.pdf"):
        shutil.copy(SAMPLE_DOCS / name, folder / name)
    settle(folder)
    summary = run_job(options(tiny_model, [folder], out, markdown_dir=folder / "md"))
    rows = {Path(r["path"]).name: r for r in pq.read_table(out).to_pylist()}
    return summary, rows, folder


@pytest.mark.slow
def test_cdla_blocks_prompts_and_markdown(cdla_run):
    summary, rows, folder = cdla_run
    assert summary.pages_ok == 2 and summary.pages_failed == 0
    order = rows["purchase-order-table.pdf"]
    tables = [b for b in order["blocks"] if b["label"] == "table"]
    assert len(tables) == 1 and tables[0]["prompt"] == "Table Recognition:"
    assert tables[0]["x1"] > tables[0]["x0"] and tables[0]["n_image_tokens"] > 0
    assert order["n_image_tokens"] == sum(b["n_image_tokens"] for b in order["blocks"])
    assert order["n_output_tokens"] == sum(b["n_output_tokens"] for b in order["blocks"])

    article = rows["two-column-article.pdf"]
    blocks = article["blocks"]
    assert [b["order"] for b in blocks] == list(range(len(blocks)))
    body = [b for b in blocks if b["label"] == "text"]
    middle = (min(b["x0"] for b in body) + max(b["x1"] for b in body)) / 2
    columns = ["left" if b["x1"] <= middle else "right" for b in body]
    # The left column is read to its end before the right one starts.
    assert columns == sorted(columns) and columns[0] == "left" and columns[-1] == "right"
    furniture = [b for b in blocks if b["label"] in ("header", "footer")]
    assert furniture and all(b["n_output_tokens"] > 0 for b in furniture)  # recognised, kept in blocks ...
    for block in furniture:
        if block["text"].strip():
            assert block["text"].strip() not in article["text"]  # ... but not in the page's Markdown
    for block in body:
        assert " ".join(block["text"].split()) in " ".join(article["text"].split())
    markdown = next((folder / "md").glob("two-column-article-*.md")).read_text()
    assert markdown.startswith("<!-- page 1 -->")


@pytest.mark.slow
def test_layout_pages_are_rendered_at_the_dpi_and_each_block_sized_within_the_block_bounds(tiny_model, tmp_path):
    import math

    from scanned_article import write_scanned_article
    from transformers import AutoImageProcessor

    from ocrbatch.job.units import BLOCK_PIXEL_BOUNDS

    # A scanned two-column page in small type. Capped at the tiny model's 451,584 pixels, the
    # whole-page cap, this Letter page is 591x764, where CDLA takes its body for one picture.
    folder = tmp_path / "docs"
    folder.mkdir()
    write_scanned_article(folder / "scan.pdf")
    settle(folder)
    rows = {}
    for layout in ("cdla", "none"):
        # Not stitched: each text block is then one model call, its crop's own image tokens.
        run_job(options(tiny_model, [folder], tmp_path / f"{layout}.jsonl", layout=layout, stitch=False))
        [rows[layout]] = [json.loads(line) for line in (tmp_path / f"{layout}.jsonl").read_text().splitlines()]
    assert (rows["none"]["width"], rows["none"]["height"]) == (591, 764)  # whole pages keep the model's cap
    page = rows["cdla"]
    assert page["status"] == "ok" and (page["width"], page["height"]) == (935, 1210)  # 110 dpi
    blocks = page["blocks"]
    assert "image" not in [b["label"] for b in blocks]
    text = [b for b in blocks if b["label"] == "text"]
    assert all(b["prompt"] == "OCR:" and b["n_output_tokens"] > 0 for b in text)
    assert sum(b["x1"] < page["width"] / 2 for b in text) >= 4 and sum(b["x0"] > page["width"] / 2 for b in text) >= 4
    # Each block is cropped from that render and encoded within the block bounds, as PaddleX sizes it.
    processor = AutoImageProcessor.from_pretrained(tiny_model)
    bounds = {"min_pixels": BLOCK_PIXEL_BOUNDS[0], "max_pixels": BLOCK_PIXEL_BOUNDS[1]}
    for block in text:
        width = math.ceil(block["x1"]) - math.floor(block["x0"])
        height = math.ceil(block["y1"]) - math.floor(block["y0"])
        patches = processor.get_number_of_image_patches(height, width, images_kwargs=bounds)
        assert block["n_image_tokens"] == patches // 4, block


@pytest.mark.slow
def test_blocks_in_jsonl_and_duckdb(cdla_run, tiny_model, tmp_path):
    import duckdb

    _, rows, folder = cdla_run
    out = folder / "out.parquet"
    [(labels,)] = duckdb.sql(f"SELECT count(*) FROM (SELECT unnest(blocks) AS b FROM read_parquet('{out}')) "
                             "WHERE b.label = 'table'").fetchall()
    assert labels == 1
    jsonl = tmp_path / "out.jsonl"
    run_job(options(tiny_model, [folder / "purchase-order-table.pdf"], jsonl))
    [row] = [json.loads(line) for line in jsonl.read_text().splitlines()]
    same = ("order", "label", "prompt", "text", "n_image_tokens", "n_output_tokens", "finish_reason")
    assert [{k: b[k] for k in same} for b in row["blocks"]] == \
        [{k: b[k] for k in same} for b in rows["purchase-order-table.pdf"]["blocks"]]


@pytest.mark.slow
def test_pp_doclayout_with_a_tiny_random_model(tiny_model, tmp_path):
    from ocrbatch.dev.layout_model import make_layout_model

    weights_folder = make_layout_model(tmp_path / "layout", seed=1)
    out = tmp_path / "out.jsonl"
    summary = run_job(options(tiny_model, [SAMPLE_DOCS / "report.pdf"], out, layout="pp-doclayout",
                              layout_model=str(weights_folder)))
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.pages_ok == 1 and row["status"] == "ok"
    assert row["blocks"], "the seed-1 model finds blocks on every sample page"
    assert all(b["prompt"] == "Table Recognition:" for b in row["blocks"] if b["label"] == "table")
    assert [b["order"] for b in row["blocks"]] == list(range(len(row["blocks"])))


@pytest.mark.slow
def test_a_page_without_blocks_and_a_layout_model_that_fails(tiny_model, tmp_path):
    import pymupdf

    from ocrbatch.dev.layout_model import make_layout_model

    folder = tmp_path / "docs"
    folder.mkdir()
    with pymupdf.open() as document:
        document.new_page()
        document.save(folder / "blank.pdf")
    settle(folder)
    out = tmp_path / "blank.jsonl"
    summary = run_job(options(tiny_model, [folder], out))
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.pages_ok == 1 and row["blocks"] == [] and row["text"] == "" and row["n_output_tokens"] == 0

    broken = make_layout_model(tmp_path / "broken", seed=1)
    config = json.loads((broken / "preprocessor_config.json").read_text())
    config["size"] = {"height": 0, "width": 0}  # loads, then fails on every page
    (broken / "preprocessor_config.json").write_text(json.dumps(config))
    out = tmp_path / "broken.jsonl"
    summary = run_job(options(tiny_model, [SAMPLE_DOCS / "report.pdf"], out, layout="pp-doclayout",
                              layout_model=str(broken)))
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.pages_failed == 1 and "report.pdf page 1: layout analysis failed" in row["error"]


def test_a_degenerate_box_fails_its_page_with_the_reason():
    from PIL import Image

    from ocrbatch.job.units import PageWork
    from ocrbatch.layout.blocks import Block
    from ocrbatch.sources.discover import Document
    from ocrbatch.sources.rasterize import PageImage

    page = PageImage(Document(Path("x.pdf"), "d"), 1, 1, image=Image.new("RGB", (200, 100), "white"),
                     blocks=[Block(0, "text", 0.9, 250, 10, 300, 50)])
    with pytest.raises(ValueError, match="block 0 \\(text\\) has no pixels"):
        PageWork.of(page, "OCR:")


def test_the_scheduler_cuts_a_block_where_its_repetition_guard_says(engine_f32, test_images, monkeypatch):
    """The guard's loop detection is tested in test_markdown.py; here, that decoding obeys it.

    The tiny random model does not loop, so a guard that reports a loop
    after its 30th token stands in for one that found it.
    """
    from ocrbatch.model import language
    from ocrbatch.model.repetition import PROSE

    class LoopAfter30:
        def __init__(self, settings):
            assert settings is PROSE
            self.seen = 0

        def push(self, token):
            self.seen += 1
            return 25 if self.seen == 30 else None  # keep 25 tokens: the text before the loop, one turn

    [encoded] = engine_f32.vision.encode([test_images[0]])
    request = engine_f32.request(encoded, "OCR:", max_tokens=200)
    request.stop_ids = ()
    [free] = engine_f32.language.generate([request])
    monkeypatch.setattr(language, "RepetitionGuard", LoopAfter30)
    request.loop_guard = PROSE
    [guarded, unguarded] = engine_f32.language.generate([request, engine_f32.request(encoded, "OCR:", 200)])
    assert free.finish_reason == "length" and len(free.token_ids) == 200
    assert guarded.finish_reason == "repetition" and guarded.token_ids == free.token_ids[:25]
    assert unguarded.finish_reason != "repetition"  # requests without a guard are never cut


@pytest.mark.slow
def test_kill_9_mid_run_in_layout_mode_then_every_page_once_with_the_same_blocks(tiny_model, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for copy in range(3):
        for name in ("minutes-3-pages.pdf", "two-column-article.pdf"):
            target = folder / f"{copy}-{name}"
            target.write_bytes((SAMPLE_DOCS / name).read_bytes() + b"\n%% copy %d\n" % copy)  # distinct content
    settle(folder)
    args = ["run", folder, "--model", tiny_model, "--quant", "F32", "--max-tokens", "40", "--ignore-eos",
            "--seqs-per-worker", "2", "--dpi", "110", "--layout", "cdla"]
    clean_out, out = tmp_path / "clean.jsonl", tmp_path / "out.jsonl"
    clean = subprocess.run([sys.executable, "-m", "ocrbatch", *map(str, args), "--out", clean_out],
                           capture_output=True, text=True, timeout=900)
    assert clean.returncode == 0, clean.stderr
    reference = {(Path(r["path"]).name, r["page"]): (r["text"], r["blocks"])
                 for r in map(json.loads, clean_out.read_text().splitlines())}
    assert len(reference) == 12

    rng = random.Random(11)
    landed = 0
    for _ in range(3):
        before = page_states(out).get("ok", 0) if out.with_name(out.name + ".ocrbatch.db").exists() else 0
        process = subprocess.Popen([sys.executable, "-m", "ocrbatch", *map(str, args), "--out", out],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_ok_pages(out, process, at_least=before + 1)
        time.sleep(rng.uniform(0, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        states = page_states(out)
        landed += states.get("pending", 0) > 0
        time.sleep(0.3)
    assert landed >= 2
    final = subprocess.run([sys.executable, "-m", "ocrbatch", *map(str, args), "--out", out],
                           capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    got = {(Path(r["path"]).name, r["page"]): (r["text"], r["blocks"]) for r in rows}
    assert len(rows) == len(got) == 12
    assert got == reference


@pytest.mark.slow
def test_ocr_command_with_layout(tiny_model, tmp_path):
    from click.testing import CliRunner

    from ocrbatch.cli.main import main
    from ocrbatch.sources.discover import Document
    from ocrbatch.sources.rasterize import iter_pages

    [page] = iter_pages(Document(SAMPLE_DOCS / "purchase-order-table.pdf", None), [1], dpi=110)
    image = tmp_path / "order.png"
    page.image.save(image)
    result = CliRunner().invoke(main, ["ocr", str(image), "--model", str(tiny_model), "--quant", "F32",
                                       "--max-tokens", "8", "--layout", "cdla", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert [b["prompt"] for b in row["blocks"] if b["label"] == "table"] == ["Table Recognition:"]
    assert row["n_image_tokens"] > 0 and row["error"] is None


def charts_and_seals_layout_model(folder: Path) -> Path:
    """A tiny PP-DocLayoutV2 model that labels every box on ``report.pdf`` a chart or a seal.

    The seed-1 model's last class head is replaced by one that reads a single direction of the
    decoder's query states: queries on one side of its median on that page are charts, the others
    seals, every other label far below its threshold.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from ocrbatch.dev.layout_model import make_layout_model
    from ocrbatch.layout.detect import PP_DOCLAYOUT_LABELS, load_layout
    from ocrbatch.sources.discover import Document
    from ocrbatch.sources.rasterize import iter_pages

    weights_folder = make_layout_model(folder, seed=1)
    detector = load_layout("pp-doclayout", model=str(weights_folder))
    [page] = iter_pages(Document(SAMPLE_DOCS / "report.pdf", None), [1], dpi=110)
    with torch.no_grad():
        states = detector.model(pixel_values=torch.from_numpy(detector.pixel_values(page.image))).last_hidden_state[0]
    direction = states[0] - states[1]
    along = states @ direction
    median, spread = along.median(), along.std()
    weights = load_file(weights_folder / "model.safetensors")
    head = sorted(name for name in weights if name.startswith("model.decoder.class_embed."))[-2:]  # last layer's
    bias, weight = (weights[name] for name in head)
    chart, seal = PP_DOCLAYOUT_LABELS.index("chart"), PP_DOCLAYOUT_LABELS.index("seal")
    weight.zero_()
    bias.fill_(-10.0)
    weight[chart], bias[chart] = 10 * direction / spread, -10 * median / spread
    weight[seal], bias[seal] = -weight[chart], -bias[chart]
    save_file(weights, weights_folder / "model.safetensors", metadata={"format": "pt"})
    return weights_folder


@pytest.mark.slow
def test_charts_and_seals_are_pictures_unless_asked_for(tiny_model, tiny_model_15, tmp_path):
    from ocrbatch.errors import OcrbatchError

    layout_model = str(charts_and_seals_layout_model(tmp_path / "layout"))
    report = SAMPLE_DOCS / "report.pdf"
    out = tmp_path / "pictures.jsonl"
    summary = run_job(options(tiny_model_15, [report], out, layout="pp-doclayout", layout_model=layout_model,
                              markdown_dir=tmp_path / "md"))
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    labels = {b["label"] for b in row["blocks"]}
    assert summary.pages_ok == 1 and labels == {"chart", "seal"}
    assert all(b["prompt"] == "" and b["n_image_tokens"] == 0 for b in row["blocks"])
    assert row["n_output_tokens"] == 0 and row["text"].count("](") == len(row["blocks"])  # every one a picture link

    out = tmp_path / "recognised.jsonl"
    summary = run_job(options(tiny_model_15, [report], out, layout="pp-doclayout", layout_model=layout_model,
                              charts=True, seals=True))
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.pages_ok == 1
    prompts = {b["label"]: {block["prompt"] for block in row["blocks"] if block["label"] == b["label"]}
               for b in row["blocks"]}
    assert prompts == {"chart": {"Chart Recognition:"}, "seal": {"Seal Recognition:"}}
    assert all(b["n_image_tokens"] > 0 for b in row["blocks"])

    out = tmp_path / "charts.jsonl"
    run_job(options(tiny_model_15, [report], out, layout="pp-doclayout", layout_model=layout_model, charts=True))
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert {b["label"]: b["prompt"] for b in row["blocks"]} == {"chart": "Chart Recognition:", "seal": ""}

    with pytest.raises(OcrbatchError, match="'seal' needs a PaddleOCR-VL 1.5\\+ model"):
        run_job(options(tiny_model, [report], tmp_path / "v1.jsonl", layout="pp-doclayout",
                        layout_model=layout_model, seals=True))


@pytest.mark.slow
@pytest.mark.parametrize("version, default", [("1.0", "PP-DocLayoutV2_safetensors"),
                                              ("1.5", "PP-DocLayoutV3_safetensors"),
                                              ("1.6", "PP-DocLayoutV3_safetensors")])
def test_pp_doclayout_defaults_to_the_layout_model_paddlex_pairs_with_the_release(release_model, version, default,
                                                                                  tmp_path, monkeypatch):
    from ocrbatch.engine import Engine
    from ocrbatch.engines.local import PipelineError
    from ocrbatch.errors import ModelError

    # Offline, loading the default names it and fails at once: which one the job chose.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights_folder = release_model(version)
    with pytest.raises(ModelError, match=f"PaddlePaddle/{default}: cannot load the PP-DocLayout model"):
        Engine(weights_folder, quant="F32", with_language=False, layout="pp-doclayout")
    with pytest.raises(PipelineError, match=f"cannot load the layout model: .*PaddlePaddle/{default}"):
        run_job(options(weights_folder, [SAMPLE_DOCS / "report.pdf"], tmp_path / "out.jsonl", layout="pp-doclayout"))


@pytest.mark.slow
def test_a_model_keeps_its_stitching_and_recognised_pictures(cdla_run, tiny_model):
    """Stitched blocks and pictures sent to the model are other model calls, so other text: a re-run that
    changes either would mix two kinds of pages in one output, and is refused before any page is touched."""
    from ocrbatch.errors import OcrbatchError

    _, _, folder = cdla_run
    out = folder / "out.parquet"
    with pytest.raises(OcrbatchError, match="made with stitch=on, not off"):
        run_job(options(tiny_model, [folder], out, stitch=False))
    with pytest.raises(OcrbatchError, match="made with recognised_pictures=none, not chart"):
        run_job(options(tiny_model, [folder], out, charts=True))
