"""Stitching: which text blocks share one image, the stacked image, and the text dealt back per block."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from ocrbatch.job.units import PageWork
from ocrbatch.layout.blocks import Block
from ocrbatch.layout.stitch import Group, stack, stitch_groups
from ocrbatch.sources.discover import Document
from ocrbatch.sources.rasterize import PageImage


def box(label: str, order: int, x0, y0, x1, y1) -> Block:
    return Block(order, label, 0.9, float(x0), float(y0), float(x1), float(y1))


# A paragraph, then a figure on the right with the paragraph's text running on beside it:
# the piece beside the figure shares the paragraph's left margin, not its right one.
ABOVE = box("text", 0, 50, 100, 750, 200)
FIGURE = box("image", 1, 420, 210, 750, 400)
BESIDE = box("text", 2, 52, 212, 400, 400)


def orders(groups: list[Group]) -> list[list[int]]:
    return [[block.order for block in group.blocks] for group in groups]


def test_text_running_around_a_figure_is_one_group():
    [group] = stitch_groups([ABOVE, FIGURE, BESIDE])
    assert orders([group]) == [[0, 2]] and group.aligns == ("left",)


def test_pieces_of_one_line_are_one_group_centred():
    left, right = box("text", 0, 50, 100, 300, 130), box("text", 1, 340, 102, 600, 131)
    [group] = stitch_groups([left, right])
    assert orders([group]) == [[0, 1]] and group.aligns == ("center",)


@pytest.mark.parametrize("blocks", [
    # Two ordinary paragraphs: both margins shared.
    [box("text", 0, 50, 100, 750, 200), box("text", 1, 50, 210, 750, 300)],
    # One margin shared, but nothing for the text to run around.
    [ABOVE, BESIDE],
    # A wide gap between them: more than half the taller one's height.
    [ABOVE, FIGURE, box("text", 2, 52, 320, 400, 400)],
    # A title between them in reading order.
    [ABOVE, FIGURE, box("paragraph_title", 2, 52, 205, 400, 210), box("text", 3, 52, 212, 400, 400)],
    # Not text.
    [box("reference_content", 0, 50, 100, 750, 200), FIGURE, box("reference_content", 2, 52, 212, 400, 400)],
    # Side by side, too far apart: a second column.
    [box("text", 0, 50, 100, 300, 130), box("text", 1, 400, 100, 650, 130)],
])
def test_blocks_that_are_recognised_one_by_one(blocks):
    assert all(len(group.blocks) == 1 for group in stitch_groups(blocks))
    assert orders(stitch_groups(blocks)) == [[b.order] for b in blocks if b.prompt is not None]


def test_a_table_is_left_out_of_the_walk_and_can_be_what_the_text_runs_around():
    table = box("table", 1, 420, 210, 750, 400)
    below = box("text", 3, 50, 410, 750, 500)  # the text goes on at full width under the table
    groups = stitch_groups([ABOVE, table, BESIDE, below, box("paragraph_title", 4, 50, 510, 750, 540)])
    # The table is recognised alone; the text above, beside and below it is one call.
    assert orders(groups) == [[0, 2, 3], [1], [4]] and groups[0].aligns == ("left", "left")


def crops(*sizes, colour="black") -> list[Image.Image]:
    return [Image.new("RGB", size, colour) for size in sizes]


def test_crops_are_stacked_on_white_aligned_on_the_shared_edge():
    group = Group((ABOVE, BESIDE, box("text", 3, 0, 0, 10, 10)), ("left", "right"))
    image, stitched = stack(group, crops((700, 100), (350, 190), (200, 50)))
    assert image.size == (700, 340) and stitched.rows == ((0, 100), (100, 290), (290, 340))
    assert image.getpixel((10, 150)) == (0, 0, 0) and image.getpixel((690, 150)) == (255, 255, 255)  # left
    assert image.getpixel((690, 300)) == (0, 0, 0) and image.getpixel((10, 300)) == (255, 255, 255)  # right
    centred, _ = stack(Group((ABOVE, BESIDE), ("center",)), crops((700, 100), (300, 100)))
    assert centred.getpixel((350, 150)) == (0, 0, 0) and centred.getpixel((100, 150)) == (255, 255, 255)


def test_a_stack_three_times_as_tall_as_wide_is_not_made():
    group = Group((ABOVE, BESIDE), ("left",))
    assert stack(group, crops((100, 150), (100, 149))) is not None
    assert stack(group, crops((100, 150), (100, 150))) is None


def test_the_output_is_dealt_back_to_the_blocks_by_height():
    group = Group((ABOVE, BESIDE), ("left",))
    _, stitched = stack(group, crops((700, 200), (350, 100)))  # two thirds, one third
    assert stitched.split("first\nsecond\n\nthird") == {0: "first\nsecond", 2: "third"}
    assert stitched.split("one long joined line") == {0: "one long joined line", 2: ""}
    assert stitched.split("") == {0: "", 2: ""}


def page_with_text_around_a_figure() -> PageImage:
    image = Image.new("RGB", (800, 500), "white")
    draw = ImageDraw.Draw(image)
    for y in range(110, 200, 30):
        draw.line((60, y, 740, y), fill="black", width=8)  # the paragraph's lines
    for y in range(220, 400, 30):
        draw.line((60, y, 390, y), fill="black", width=8)  # its lines beside the figure
    draw.rectangle((430, 220, 740, 390), fill="grey")
    return PageImage(Document(Path("x.pdf"), "d"), 1, 1, image=image, blocks=[ABOVE, FIGURE, BESIDE])


def test_a_page_sends_the_stitched_blocks_as_one_unit_and_records_each_block():
    page = page_with_text_around_a_figure()
    work = PageWork.of(page, "OCR:")
    [unit] = work.units
    assert [b.order for b in unit.blocks] == [0, 2] and unit.prompt == "OCR:"
    assert unit.image.size == (700, 100 + 188)  # both crops, one above the other
    assert len(PageWork.of(page, "OCR:", stitch=False).units) == 2

    page.image_size = page.image.size
    unit.columns = {"text": "a1\na2\nb1\nb2\nb3\nb4", "n_output_tokens": 12, "finish_reason": "stop"}
    unit.n_image_tokens = 300
    row = work.row("ocr", "m", "F32")
    blocks = {b["order"]: b for b in row["blocks"]}
    assert [b["order"] for b in row["blocks"]] == [0, 1, 2]  # one entry per detected block
    assert blocks[0]["text"] == "a1\na2" and blocks[2]["text"] == "b1\nb2\nb3\nb4"
    assert (blocks[0]["n_image_tokens"], blocks[0]["n_output_tokens"]) == (300, 12)  # the unit's, once
    assert (blocks[2]["n_image_tokens"], blocks[2]["n_output_tokens"]) == (0, 0)
    assert blocks[0]["group"] == blocks[2]["group"] == 0 and blocks[1]["group"] == 1
    assert blocks[2]["prompt"] == "OCR:" and blocks[2]["finish_reason"] == "stop"
    assert (row["n_image_tokens"], row["n_output_tokens"]) == (300, 12)
    assert row["text"] == "a1\n\na2\n\nb1\n\nb2\n\nb3\n\nb4"


@pytest.mark.parametrize("flags, stitch", [([], True), (["--no-stitch"], False)])
def test_the_command_line_turns_stitching_off(flags, stitch, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import ocrbatch.engines.local
    from ocrbatch.cli.main import main

    seen = []

    def plan_only(options):
        seen.append(options.stitch)
        raise SystemExit(0)

    monkeypatch.setattr(ocrbatch.engines.local, "dry_run", plan_only)
    result = CliRunner().invoke(main, ["run", str(tmp_path), "--out", str(tmp_path / "o.parquet"), "--dry-run",
                                       *flags])
    assert result.exit_code == 0, result.output
    assert seen == [stitch]


def test_the_engine_recognises_the_stitched_blocks_in_one_model_call(engine_f32, monkeypatch):
    from ocrbatch.job.units import BLOCK_PIXEL_BOUNDS, layout_units

    class Fixed:
        """A layout model that finds the page's paragraph, figure and the text beside it."""

        name = "fixed"

        def detect(self, image):
            return [ABOVE, FIGURE, BESIDE]

    calls = []
    generate = engine_f32.language.generate

    def counted(requests):
        calls.append(len(requests))
        return generate(requests)

    monkeypatch.setattr(engine_f32, "layout", Fixed())
    monkeypatch.setattr(engine_f32.language, "generate", counted)
    image = page_with_text_around_a_figure().image
    [stitched] = engine_f32.ocr([image], max_tokens=24)
    monkeypatch.setattr(engine_f32, "stitch", False)
    [alone] = engine_f32.ocr([image], max_tokens=24)
    assert calls == [1, 2] and stitched.ok and alone.ok
    [unit], _ = layout_units(image, [ABOVE, FIGURE, BESIDE])
    [encoded] = engine_f32.vision.encode([unit.image], BLOCK_PIXEL_BOUNDS)
    assert stitched.n_image_tokens == encoded.n_tokens
    # The one call's output, line by line, is the two blocks' texts in order: nothing lost, nothing doubled.
    lines = [line for line in engine_f32.prompts.decode(stitched.token_ids).splitlines() if line.strip()]
    texts = {block["order"]: block["text"] for block in stitched.blocks}
    assert texts[1] == "" and lines == texts[0].splitlines() + texts[2].splitlines()
    assert [block["order"] for block in alone.blocks] == [0, 1, 2]
