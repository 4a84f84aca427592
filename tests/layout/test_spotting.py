"""Spotting output (``<|LOC_n|>`` tokens on a 0–1000 grid) read into text and quadrilaterals in page pixels."""

from __future__ import annotations

import pytest
from PIL import Image

from ocrbatch.layout.spotting import SPOTTING_PIXEL_BOUNDS, Spot, prepare, read_spots, spotted_text


def locs(*values: int) -> str:
    return "".join(f"<|LOC_{value}|>" for value in values)


def test_one_piece_per_line_with_its_corners_in_page_pixels():
    output = (f"Invoice 2024{locs(100, 50, 500, 50, 500, 100, 100, 100)}\n"
              f"Total: 42.00{locs(0, 900, 1000, 900, 1000, 1000, 0, 1000)}\n")
    spots = read_spots(output, 800, 600)
    assert spots == [Spot("Invoice 2024", (80.0, 30.0, 400.0, 30.0, 400.0, 60.0, 80.0, 60.0)),
                     Spot("Total: 42.00", (0.0, 540.0, 800.0, 540.0, 800.0, 600.0, 0.0, 600.0))]
    assert spotted_text(spots) == "Invoice 2024\n\nTotal: 42.00"


def test_a_slanted_quadrilateral_keeps_its_four_corners():
    [spot] = read_spots("Stamp" + locs(200, 100, 300, 150, 280, 190, 180, 140), 1000, 2000)
    assert spot.quad == (200.0, 200.0, 300.0, 300.0, 280.0, 380.0, 180.0, 280.0)
    assert spot.to_dict() == {"text": "Stamp", "quad": [200.0, 200.0, 300.0, 300.0, 280.0, 380.0, 180.0, 280.0]}


def test_tagged_pieces():
    output = ("<|TEXT_START|> Name <|TEXT_END|><|LOC_BEGIN|>" + locs(10, 10, 90, 10, 90, 20, 10, 20) + "<|LOC_END|>"
              "<|TEXT_START|>Date<|TEXT_END|>\n<|LOC_BEGIN|>" + locs(10, 30, 90, 30, 90, 40, 10, 40, 99)
              + "<|LOC_END|>")
    spots = read_spots(output, 1000, 1000)
    assert [spot.text for spot in spots] == ["Name", "Date"]
    assert spots[1].quad == (10.0, 30.0, 90.0, 30.0, 90.0, 40.0, 10.0, 40.0)  # a ninth value is ignored


def test_incomplete_corners_and_empty_text_are_left_out():
    assert read_spots("no locations at all", 100, 100) == []
    assert read_spots("short" + locs(1, 2, 3, 4, 5, 6, 7), 100, 100) == []
    # Text after the last complete group has no corners; a group with nothing before it has no text.
    output = locs(1, 1, 2, 1, 2, 2, 1, 2) + "A" + locs(5, 5, 6, 5, 6, 6, 5, 6) + "trailing"
    assert [spot.text for spot in read_spots(output, 1000, 1000)] == ["A"]
    tagged_short = "<|TEXT_START|>x<|TEXT_END|><|LOC_BEGIN|>" + locs(1, 2, 3) + "<|LOC_END|>"
    assert read_spots(tagged_short, 100, 100) == []


def test_small_pages_are_enlarged_twice_before_spotting():
    small = Image.new("RGB", (1200, 1499), "white")
    assert prepare(small).size == (2400, 2998)
    large = Image.new("RGB", (1500, 900), "white")
    assert prepare(large) is large
    assert SPOTTING_PIXEL_BOUNDS == (112896, 2048 * 28 * 28)


# ------------------------------------------------------------------ in the batch job

def spotting_page(folder, size=(640, 480)):
    from helpers import document_image, settle

    folder.mkdir()
    document_image(*size, seed=4).save(folder / "page.png")
    settle(folder)
    return folder


def job(model, folder, out, **overrides):
    from pathlib import Path

    from ocrbatch.job.options import JobOptions

    settings = dict(paths=[Path(folder)], out=Path(out), model=str(model), quant="F32", max_tokens=16,
                    progress=False, min_file_age=0, layout="none", task="spotting")
    return JobOptions(**{**settings, **overrides})


@pytest.mark.slow
def test_a_spotting_page_is_enlarged_encoded_within_the_spotting_bounds_and_read_as_the_engine_reads_it(
        release_model, tmp_path):
    import json

    from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import smart_resize

    from ocrbatch.engine import Engine
    from ocrbatch.engines.local import run_job

    model = release_model("1.5")  # the release's own bounds: 112,896 to 1,003,520 pixels
    folder = spotting_page(tmp_path / "docs")
    out = tmp_path / "out.jsonl"
    summary = run_job(job(model, folder, out))
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.pages_ok == 1 and row["task"] == "spotting" and (row["width"], row["height"]) == (640, 480)
    # Enlarged to 1280 x 960 (1,228,800 pixels: above the other tasks' maximum) and encoded as it is.
    height, width = smart_resize(960, 1280, factor=28, min_pixels=SPOTTING_PIXEL_BOUNDS[0],
                                 max_pixels=SPOTTING_PIXEL_BOUNDS[1])
    assert row["n_image_tokens"] == (height // 28) * (width // 28) > 1003520 // 28 ** 2
    engine = Engine(model, quant="F32", max_tokens=16)
    [alone] = engine.ocr([folder / "page.png"], task="spotting")
    engine.close()
    assert alone.n_image_tokens == row["n_image_tokens"]
    # The tiny model's tokenizer has no location tokens, so its answer holds no spots.
    assert (row["text"], row["spots"]) == (alone.text, alone.spots) == ("", [])


@pytest.mark.slow
def test_a_spotting_answer_from_a_server_becomes_text_and_quadrilaterals_in_page_pixels(tmp_path):
    import json

    import pyarrow.parquet as pq
    from fault_server import FaultServer, Ok

    from ocrbatch.engines.local import run_job

    folder = spotting_page(tmp_path / "docs", size=(800, 600))
    answer = (f"Invoice{locs(100, 100, 400, 100, 400, 150, 100, 150)}\n"
              f"Total 42{locs(500, 800, 900, 820, 890, 900, 490, 880)}\n")
    with FaultServer() as server:
        server.script("Spotting:", Ok(text=answer), Ok(text=answer))
        for out in (tmp_path / "out.jsonl", tmp_path / "out.parquet"):
            summary = run_job(job("unused", folder, out, backend="openai", base_url=server.url))
            assert summary.pages_ok == 1
        [seen, _] = server.requests_for("Spotting:")
    assert seen.body["skip_special_tokens"] is False
    assert seen.body["mm_processor_kwargs"] == {"min_pixels": 112896, "max_pixels": 1605632}
    [row] = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert row["text"] == "Invoice\n\nTotal 42"
    assert row["spots"] == [{"text": "Invoice", "quad": [80.0, 60.0, 320.0, 60.0, 320.0, 90.0, 80.0, 90.0]},
                            {"text": "Total 42", "quad": [400.0, 480.0, 720.0, 492.0, 712.0, 540.0, 392.0, 528.0]}]
    [parquet] = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [spot["text"] for spot in parquet["spots"]] == ["Invoice", "Total 42"]
    assert parquet["spots"][1]["quad"] == pytest.approx(row["spots"][1]["quad"])


def test_spotting_needs_a_later_release(tiny_model, tmp_path):
    from ocrbatch.engines.local import run_job
    from ocrbatch.errors import OcrbatchError

    folder = spotting_page(tmp_path / "docs")
    with pytest.raises(OcrbatchError, match="'spotting' needs a PaddleOCR-VL 1.5\\+ model"):
        run_job(job(tiny_model, folder, tmp_path / "out.jsonl"))


def test_spotting_with_a_layout_is_a_bad_command_line(tmp_path):
    from click.testing import CliRunner

    from ocrbatch.cli.main import main

    folder = spotting_page(tmp_path / "docs")
    result = CliRunner().invoke(main, ["run", str(folder), "--out", str(tmp_path / "out.jsonl"), "--task", "spotting"])
    assert result.exit_code == 2 and "spotting reads whole pages" in result.output
    assert not (tmp_path / "out.jsonl").exists()
