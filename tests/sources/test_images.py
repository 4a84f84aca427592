"""Images decoded with a pixel limit of each call's own."""

import pytest
from PIL import Image

from ocrbatch.errors import InputError
from ocrbatch.sources import images


def test_the_pixel_limit_is_each_calls_and_leaves_pillows_global_alone(tmp_path, monkeypatch):
    """The server decodes images on several threads with its own limit: one call's limit must not be another's."""
    seen = []
    real_open = Image.open

    def open_and_note(*args, **kwargs):
        seen.append(Image.MAX_IMAGE_PIXELS)  # what a decode on another thread would see at this moment
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", open_and_note)
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30)).save(small)
    pillows = Image.MAX_IMAGE_PIXELS
    with pytest.raises(InputError, match="small.png: image of 40x30 pixels exceeds the limit of 1000 pixels"):
        images.open_image(small, max_pixels=1000)
    assert images.open_image(small, max_pixels=1200).size == (40, 30)
    assert seen == [pillows, pillows]
