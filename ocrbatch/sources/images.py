"""Loading images from files with clear, one-line errors.

PIL opens files lazily; :func:`open_image` forces a full decode so that a
truncated file fails here, naming the file, rather than deep inside the model.
A pixel cap guards against decompression bombs.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import InputError

# Far above any page at OCR resolution, far below what would exhaust memory.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000


def open_image(source: str | Path | bytes, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, frame: int = 0) -> Image.Image:
    """Decode ``source`` (a path or raw bytes) to an RGB image, or raise :class:`InputError`."""
    label = name or (str(source) if not isinstance(source, bytes) else "image")
    if isinstance(source, bytes):
        if not source:
            raise InputError(f"{label}: empty image data")
        stream = io.BytesIO(source)
    else:
        path = Path(source)
        try:
            if path.stat().st_size == 0:
                raise InputError(f"{label}: empty file (0 bytes)")
            stream = open(path, "rb")
        except FileNotFoundError:
            raise InputError(f"{label}: no such file") from None
        except PermissionError:
            raise InputError(f"{label}: permission denied") from None
        except OSError as exc:
            raise InputError(f"{label}: cannot read ({exc.strerror or exc})") from None
    # The limit is checked here, from the header, before decoding, rather than by setting Pillow's global
    # MAX_IMAGE_PIXELS per call, which would race between the server's threads. Pillow still refuses, on its
    # own, images over twice its limit (DecompressionBombError), which caps ``max_pixels``.
    try:
        with stream:
            image = Image.open(stream)
            width, height = image.size
            if width * height > max_pixels:
                raise InputError(f"{label}: image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
            if frame:
                image.seek(frame)
            image.load()
            return image.convert("RGB")
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"{label}: image exceeds the limit of {max_pixels} pixels (decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise InputError(f"{label}: not a recognised image format") from None
    except EOFError:
        raise InputError(f"{label}: frame {frame + 1} does not exist") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{label}: corrupt or truncated image ({exc})") from None
