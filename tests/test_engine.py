"""The public Engine facade."""

import shutil
from pathlib import Path

import pytest
import torch
from helpers import job_options, read_rows, settle

from ocrbatch import Engine
from ocrbatch.engines.local import run_job

SAMPLE_DOCS = Path(__file__).parents[1] / "sample_docs"


def test_an_engine_sets_torchs_threads_while_open_and_puts_them_back_on_close(tiny_model):
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    engine = Engine(tiny_model, quant="F32", threads=wanted, with_language=False)
    try:
        assert torch.get_num_threads() == wanted
    finally:
        engine.close()
    assert torch.get_num_threads() == before


@pytest.mark.slow
def test_the_engines_layout_mode_reads_a_page_as_the_batch_job_does(tiny_model, tmp_path):
    """``Engine.ocr`` with a layout runs the job's page flow: the same blocks, prompts, outputs and Markdown."""
    image = SAMPLE_DOCS / "scanned-delivery-note.jpg"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(image, inbox / image.name)
    settle(inbox)
    run_job(job_options(tiny_model, [inbox], tmp_path / "out.parquet", max_tokens=12, layout="cdla"))
    [row] = read_rows(tmp_path / "out.parquet")
    engine = Engine(tiny_model, quant="F32", max_tokens=12, layout="cdla")
    try:
        [result] = engine.ocr([image])
    finally:
        engine.close()
    assert row["status"] == "ok" and result.error is None
    assert len(row["blocks"]) > 1 and result.text == row["text"]
    assert result.n_image_tokens == row["n_image_tokens"] > 0

    def read(block):
        return block["order"], block["label"], block["prompt"], block["text"], block["finish_reason"]

    assert [read(block) for block in result.blocks] == [read(block) for block in row["blocks"]]
    boxes = [[b["x0"], b["y0"], b["x1"], b["y1"]] for b in row["blocks"]]  # float32 in the output
    assert [block["box"] for block in result.blocks] == [pytest.approx(box, rel=1e-6) for box in boxes]
