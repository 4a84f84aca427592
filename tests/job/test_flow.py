"""The page flow every engine drives: page → units → encoded → decoded → row, and where a page fails.

The engines' own tests (test_batch, test_layout_job, test_remote_job, test_ray) run it end to end; here each
step's rules, on pages made in the test and a stand-in vision encoder whose failures the test chooses.
"""

from pathlib import Path

import numpy as np
from PIL import Image

from ocrbatch.backends.base import Decoded
from ocrbatch.job.flow import FinishedPage, PageFlow
from ocrbatch.layout.blocks import Block
from ocrbatch.model.vision import EncodedImage
from ocrbatch.sources.discover import Document
from ocrbatch.sources.rasterize import PageImage

FLOW = PageFlow("ocr", "OCR:", "m", "F32")


def page(number: int = 1, size=(200, 100), **settings) -> PageImage:
    image = Image.new("RGB", size, "white")
    return PageImage(Document(Path("/docs/a.pdf"), "id-a"), number, 3, image=image, **settings)


class Vision:
    """Encodes each image to as many tokens as its width / 10; fails on images as wide as ``refuse``."""

    def __init__(self, refuse: int | None = None):
        self.refuse, self.calls = refuse, []

    def n_patches_for(self, width, height, bounds=None):
        return width * height // 196

    def encode(self, images, bounds=None):
        self.calls.append(len(images))
        if any(image.width == self.refuse for image in images):
            raise RuntimeError("no such luck")
        return [EncodedImage(np.zeros((image.width // 10, 4), np.float32), (1, 2, 2)) for image in images]


def test_a_page_that_needs_no_model_gets_its_row_at_once():
    failed = FLOW.start(page(error="/docs/a.pdf page 1: cannot be rendered (bad)"))
    assert isinstance(failed, FinishedPage) and failed.row["status"] == "failed"
    assert failed.row["error"] == "/docs/a.pdf page 1: cannot be rendered (bad)" and failed.row["page_count"] == 3

    text = page(text_layer="Hello", image_size=(200, 100))
    text.image = None
    read = FLOW.start(text)
    assert read.row["source"] == "text-layer" and read.row["text"] == "Hello" and read.row["n_output_tokens"] == 0

    pictures = FLOW.start(page(blocks=[Block(0, "image", 0.9, 10, 10, 90, 60)]))  # nothing to recognise
    assert pictures.row["status"] == "ok" and [b["label"] for b in pictures.row["blocks"]] == ["image"]


def test_a_degenerate_block_fails_its_page_naming_it():
    finished = FLOW.start(page(blocks=[Block(0, "text", 0.9, 500, 500, 600, 600)]))  # outside the page
    assert finished.row["status"] == "failed"
    assert finished.row["error"].startswith("/docs/a.pdf page 1: ")


def test_a_page_becomes_its_units_and_lets_go_of_its_image():
    whole = FLOW.start(page())
    assert len(whole.units) == 1 and whole.units[0].prompt == "OCR:" and whole.units[0].loop_guard is None
    assert whole.page.image is None and whole.page.image_size == (200, 100)
    blocks = [Block(0, "text", 0.9, 0, 0, 200, 40), Block(1, "table", 0.9, 0, 50, 200, 100)]
    layout = PageFlow("ocr", "OCR:", "m", "F32", stitch=False).start(page(blocks=blocks))
    assert [unit.prompt for unit in layout.units] == ["OCR:", "Table Recognition:"]


def test_an_image_the_encoder_refuses_fails_its_page_and_only_its_page():
    first = FLOW.start(page(1, size=(200, 100)))
    refused = FLOW.start(page(2, size=(310, 100)))
    third = FLOW.start(page(3, size=(120, 100)))
    out = list(FLOW.encode(Vision(refuse=310), [first, refused, third], max_batch_patches=10**6))
    finished = [item for item in out if isinstance(item, FinishedPage)]
    ready = [item for item in out if not isinstance(item, FinishedPage)]
    assert [work.page.page for work, _ in ready] == [1, 3]
    assert [unit.n_image_tokens for _, unit in ready] == [20, 12] and all(unit.image is None for _, unit in ready)
    [failure] = finished
    assert failure.page.page == 2 and refused.failed
    assert failure.row["error"] == "/docs/a.pdf page 2: vision encoder failed (RuntimeError: no such luck)"


def test_a_page_is_finished_when_its_last_unit_is_and_failed_at_its_first_failure():
    blocks = [Block(0, "text", 0.9, 0, 0, 200, 30), Block(1, "text", 0.9, 0, 35, 200, 65),
              Block(2, "table", 0.9, 0, 70, 200, 100)]
    flow = PageFlow("ocr", "OCR:", "m", "F32", stitch=False)
    work = flow.start(page(blocks=blocks))
    ready = list(flow.encode(Vision(), [work], max_batch_patches=10**6))
    first, second, third = (unit for _, unit in ready)
    assert flow.settle(work, second, Decoded(text="two", n_output_tokens=2, finish_reason="stop")) is None
    assert flow.settle(work, first, Decoded(text="one", n_output_tokens=1, finish_reason="length")) is None
    done = flow.settle(work, third, Decoded(text="<fcel>x<nl>", n_output_tokens=3, finish_reason="repetition",
                                            n_image_tokens=99))
    assert done.row["status"] == "ok" and [b["text"] for b in done.row["blocks"]][:2] == ["one", "two"]
    assert done.row["n_output_tokens"] == 6 and done.row["finish_reason"] == "repetition"
    # A backend that counts image tokens itself (a server's usage) overrides the encoder's count.
    assert [b["n_image_tokens"] for b in done.row["blocks"]] == [20, 20, 99]

    work = flow.start(page(blocks=blocks))
    ready = list(flow.encode(Vision(), [work], max_batch_patches=10**6))
    (_, first), (_, second), (_, third) = ready
    assert flow.settle(work, first, Decoded(text="one", n_output_tokens=1, finish_reason="stop")) is None
    failed = flow.settle(work, second, Decoded(error="llama_decode failed"))
    assert failed.row["status"] == "failed" and failed.row["error"] == "/docs/a.pdf page 1 block 1: llama_decode failed"
    assert flow.settle(work, third, Decoded(text="late")) is None  # the page is failed once, and stays failed


def test_units_come_out_of_each_forward_pass_before_the_next_pass_runs():
    """So the local engine decodes a batch's first units while the encoder works on the rest."""
    vision = Vision()
    works = [FLOW.start(page(number, size=(140, 140))) for number in (1, 2, 3)]  # 100 patches each
    ready = FLOW.encode(vision, works, max_batch_patches=200)  # two pages a pass
    first_work, _ = next(ready)
    assert first_work.page.page == 1 and vision.calls == [2]  # the second pass has not run
    assert [work.page.page for work, _ in ready] == [2, 3] and vision.calls == [2, 1]
