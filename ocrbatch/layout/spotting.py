"""Text spotting (PaddleOCR-VL 1.5+, ``Spotting:``): where each piece of a page's text is.

The model answers a ``Spotting:`` prompt with each piece of text it reads
followed by the four corners of its quadrilateral, clockwise from the top
left, as eight location tokens ``<|LOC_n|>`` (x, y, x, y, …) on a 0–1000 grid
over the image: ``Total<|LOC_102|><|LOC_88|>…<|LOC_131|>``, one piece per
line; some outputs wrap each piece as ``<|TEXT_START|>…<|TEXT_END|>`` and its
corners as ``<|LOC_BEGIN|>…<|LOC_END|>``. The location tokens are special
tokens, so the output is decoded with them kept (a server is asked not to
skip them) and read here into :class:`Spot`\\ s in page pixels.

As PaddleX and the model card prepare it, a page is first enlarged twice
(Lanczos) when both its sides are under 1,500 pixels, and encoded within
:data:`SPOTTING_PIXEL_BOUNDS`, above the other tasks' 1,003,520-pixel limit:
small type needs the pixels to be placed precisely. The grid is relative,
so corners map onto the page as it was rendered, before that enlargement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image

# (min, max) pixels the image processor resizes a spotting image within (2048 · 28² at most).
SPOTTING_PIXEL_BOUNDS = (112896, 1605632)
# A page whose sides are both shorter than this is enlarged twice before spotting.
UPSCALE_BELOW = 1500
LOC_GRID = 1000

_TAGGED = re.compile(r"<\|TEXT_START\|>(.*?)<\|TEXT_END\|>\s*<\|LOC_BEGIN\|>(.*?)<\|LOC_END\|>", re.DOTALL)
_LOC = re.compile(r"<\|LOC_(\d+)\|>")
_CORNERS = 8  # four (x, y) pairs


@dataclass(frozen=True)
class Spot:
    """One piece of text and its quadrilateral: four (x, y) corners in page pixels, clockwise from the top left."""

    text: str
    quad: tuple[float, ...]  # x1, y1, x2, y2, x3, y3, x4, y4

    def to_dict(self) -> dict:
        return {"text": self.text, "quad": list(self.quad)}


def prepare(image: Image.Image) -> Image.Image:
    """The page as it is sent for spotting: enlarged twice (Lanczos) when both sides are under 1,500 pixels."""
    if image.width < UPSCALE_BELOW and image.height < UPSCALE_BELOW:
        return image.resize((image.width * 2, image.height * 2), Image.Resampling.LANCZOS)
    return image


def _quad(locations: list[str], width: float, height: float) -> tuple[float, ...]:
    """The first eight grid values as page pixels: x values scaled by ``width``, y values by ``height``."""
    return tuple(int(value) * (width if i % 2 == 0 else height) / LOC_GRID
                 for i, value in enumerate(locations[:_CORNERS]))


def read_spots(output: str, width: float, height: float) -> list[Spot]:
    """The spots in a ``Spotting:`` output decoded with its special tokens, in a ``width`` x ``height`` page.

    Tagged pieces are read when there are any; otherwise each run of
    eight location tokens closes the piece of text before it. A piece
    with fewer than eight corner values, or with no text, is left out.
    """
    spots = []
    for text, locations in _TAGGED.findall(output):
        corners = _LOC.findall(locations)
        if len(corners) >= _CORNERS and text.strip():
            spots.append(Spot(text.strip(), _quad(corners, width, height)))
    if spots:
        return spots
    tokens = list(_LOC.finditer(output))
    text_from = 0
    for first in range(0, len(tokens) - _CORNERS + 1, _CORNERS):
        group = tokens[first:first + _CORNERS]
        text = output[text_from:group[0].start()].strip()
        text_from = group[-1].end()
        if text:
            spots.append(Spot(text, _quad([token.group(1) for token in group], width, height)))
    return spots


def spotted_text(spots: list[Spot]) -> str:
    """A spotting page's text: its pieces in the model's order, a blank line between them (as PaddleX writes it)."""
    return "\n\n".join(spot.text for spot in spots)
