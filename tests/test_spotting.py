"""Spotting output (``<|LOC_n|>`` tokens on a 0–1000 grid) read into text and quadrilaterals in page pixels."""

from __future__ import annotations

import pytest
from PIL import Image

from ocrbatch.spotting import SPOTTING_PIXEL_BOUNDS, Spot, prepare, read_spots, spotted_text


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
