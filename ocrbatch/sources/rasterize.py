"""Rasterization: PDF pages (PyMuPDF) and image files to RGB page images.

Pages are produced one at a time, so a large PDF never has all its pages in
memory. Every render is capped at ``max_pixels``: the zoom is lowered before
rendering, so a poster or an engineering drawing never becomes a giant
pixmap first. :func:`page_pixel_cap` says what the cap is for a job.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image

from ..errors import InputError
from ..layout.spotting import SPOTTING_PIXEL_BOUNDS
from ..storage import ObjectPath, StorageError
from . import video
from .discover import Document
from .images import DEFAULT_MAX_IMAGE_PIXELS, open_image
from .video import DEFAULT_VIDEO_FPS


@dataclass
class PageImage:
    """One rendered page, or why it could not be rendered."""

    document: Document
    page: int  # 1-based
    page_count: int
    image: Image.Image | None = None
    error: str | None = None
    render_s: float = 0.0
    # Kept after the image is dropped, once the page is encoded.
    image_size: tuple[int, int] | None = None
    n_image_tokens: int = 0
    # Set instead of ``image`` for a page taken from its PDF text layer (``--pdf-text``).
    text_layer: str | None = None
    # The page's layout blocks in reading order (``--layout``); None: the page is one unit.
    blocks: list | None = None
    layout_s: float = 0.0
    # A video frame's time from the start of the video (``timestamp_s``); None for PDFs and images.
    timestamp_s: float | None = None


# Layout mode renders pages at --dpi, as PaddleX does (zoom 2.0, no cap): the model's pixel bounds
# apply to each block crop, never to the page. Only pages far beyond any paper size are capped, so
# that one poster's pixmap (3 bytes a pixel, copied a few times on its way) stays within memory:
# A3 at 300 dpi (17.4 million pixels) renders whole, an A0 poster at 150 dpi (27 million) does not.
LAYOUT_PAGE_MAX_PIXELS = 20_000_000


def page_pixel_cap(layout: str, model_max_pixels: int, max_pixels: int | None = None, task: str = "ocr") -> int:
    """The most pixels a page of a job is rendered with.

    A whole page (``layout`` none) is the image the model encodes: at most
    ``max_pixels`` (``--max-pixels``) and never above the model processor's
    ``model_max_pixels``, or for ``task`` spotting the spotting bound (more
    pixels than the other tasks get; see :mod:`ocrbatch.layout.spotting`). In layout mode
    the layout model sees the page and the language model only its block
    crops, each resized within the block bounds, so the page keeps its
    ``--dpi`` up to :data:`LAYOUT_PAGE_MAX_PIXELS`.
    """
    if layout != "none":
        return LAYOUT_PAGE_MAX_PIXELS
    if task == "spotting":
        model_max_pixels = SPOTTING_PIXEL_BOUNDS[1]
    return min(max_pixels or model_max_pixels, model_max_pixels)


def pdf_zoom(width_pt: float, height_pt: float, dpi: float, max_pixels: int) -> float:
    """Zoom factor for a page: ``dpi``, lowered so the render stays within ``max_pixels``."""
    zoom = dpi / 72.0
    area = max(width_pt * height_pt, 1e-6)
    if area * zoom * zoom > max_pixels:
        zoom = math.sqrt(max_pixels / area)
        # Pixmap sides are rounded up; shrink until the rounded render fits too.
        while math.ceil(width_pt * zoom) * math.ceil(height_pt * zoom) > max_pixels:
            zoom *= 0.999
    return zoom


def open_pdf_file(path: Path | ObjectPath):
    """``pymupdf.open`` of the PDF at ``path``, whatever bytes its name holds.

    MuPDF takes a file name as UTF-8 text, so a name that is not UTF-8 (as files written by other
    systems may have) is opened through the /proc/self/fd name of a descriptor; MuPDF opens that
    name anew, so the descriptor is closed at once.
    """
    import pymupdf

    if isinstance(path, ObjectPath):
        # MuPDF reads by random access, from bytes or a file only: a temporary file keeps a large PDF out
        # of memory. MuPDF opens the file anew and keeps it open, so the copy's block can end at once.
        # A path from fetched() is not downloaded again.
        with path.downloaded() as held:
            return pymupdf.open(held.copy, filetype="pdf")
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            return pymupdf.open(f"/proc/self/fd/{descriptor}", filetype="pdf")
        finally:
            os.close(descriptor)
    return pymupdf.open(path, filetype="pdf")


@contextlib.contextmanager
def fetched(document: Document) -> Iterator[Document]:
    """``document`` for the readers inside the block: a PDF in object storage downloaded once for them
    all (the text layer's routing and Markdown, the render), not once each. Other documents as they are.

    A missing object, or one we may not read, is the document's problem (:class:`InputError`), as for a file.
    """
    if document.kind != "pdf" or not isinstance(document.path, ObjectPath):
        yield document
        return
    with contextlib.ExitStack() as stack:
        try:
            held = stack.enter_context(document.path.downloaded())
        except FileNotFoundError:
            raise InputError(f"{document.path}: no such object") from None
        except PermissionError:
            raise InputError(f"{document.path}: access refused") from None
        yield replace(document, path=held)


def _open_pdf(document: Document):
    try:
        pdf = open_pdf_file(document.path)
    except StorageError:
        raise  # the store failed, not the document
    except Exception as exc:
        raise InputError(f"{document.path}: not a readable PDF ({exc})") from None
    if pdf.needs_pass:
        pdf.close()
        raise InputError(f"{document.path}: encrypted PDF (needs a password)")
    if pdf.page_count == 0:
        pdf.close()
        raise InputError(f"{document.path}: PDF has no pages")
    return pdf


def count_pages(document: Document, video_fps: float = DEFAULT_VIDEO_FPS) -> int:
    """Number of pages, or :class:`InputError` if the document cannot be opened.

    A video's pages are its kept frames at ``video_fps``, and one more (failed) if it breaks off:
    this decodes it once (see :mod:`ocrbatch.sources.video`).
    """
    if document.kind == "video":
        return video.survey(document.path, video_fps).page_count
    if document.kind == "pdf":
        pdf = _open_pdf(document)
        try:
            return pdf.page_count
        finally:
            pdf.close()
    with _checked_image(document) as image:
        return getattr(image, "n_frames", 1)


class _checked_image:
    """Open an image file just far enough to know its size and frames."""

    def __init__(self, document: Document):
        self.document = document

    def __enter__(self) -> Image.Image:
        path = self.document.path
        # An object is read in ranges: knowing its size and frames takes its header alone.
        self.handle = path.open() if isinstance(path, ObjectPath) else None
        try:
            self.image = Image.open(self.handle or path)
        except BaseException as exc:
            if self.handle is not None:
                self.handle.close()
            if isinstance(exc, FileNotFoundError):
                raise InputError(f"{path}: no such file") from None
            if isinstance(exc, PermissionError):
                raise InputError(f"{path}: permission denied") from None
            if not isinstance(exc, Exception):
                raise
            # open_image gives the precise one-line reason (empty, corrupt, ...)
            open_image(path.read_bytes() if isinstance(path, ObjectPath) else path, name=str(path))
            raise InputError(f"{path}: not a recognised image format") from None
        return self.image

    def __exit__(self, *exc):
        self.image.close()
        if self.handle is not None:
            self.handle.close()


def _fit(image: Image.Image, max_pixels: int) -> Image.Image:
    width, height = image.size
    if width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    return image.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.Resampling.BICUBIC)


@contextlib.contextmanager
def _page_source(document: Document, dpi: float, max_pixels: int, max_image_pixels: int):
    """Yield ``(page_count, render)``, where ``render(number)`` returns one page's image."""
    if document.kind == "pdf":
        import pymupdf

        pdf = _open_pdf(document)

        def render(number: int) -> Image.Image:
            page = pdf[number - 1]
            zoom = pdf_zoom(page.rect.width, page.rect.height, dpi, max_pixels)
            pixmap = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False, colorspace="rgb")
            return Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples)

        try:
            yield pdf.page_count, render
        finally:
            pdf.close()
        return

    path = document.path
    source = path.read_bytes() if isinstance(path, ObjectPath) else path  # an object is fetched once, not per frame

    def render(number: int) -> Image.Image:
        name = f"{document.path} page {number}"
        return _fit(open_image(source, name=name, max_pixels=max_image_pixels, frame=number - 1), max_pixels)

    yield count_pages(document), render


def iter_pages(document: Document, pages: Iterable[int], dpi: float = 150, max_pixels: int = 1536 * 1536,
               max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               video_fps: float = DEFAULT_VIDEO_FPS) -> Iterator[PageImage]:
    """Render the given 1-based ``pages`` of ``document``, one at a time.

    Raises :class:`InputError` if the document cannot be opened at all; a page
    that fails on its own, for whatever reason, comes back with ``error`` set.
    """
    if document.kind == "video":
        yield from _video_pages(document, set(pages), max_pixels, video_fps)
        return
    with _page_source(document, dpi, max_pixels, max_image_pixels) as (count, render):
        for number in sorted(set(pages)):
            if not 1 <= number <= count:
                yield PageImage(document, number, count, error=f"{document.path} page {number}: no such page")
                continue
            started = time.perf_counter()
            try:
                image = render(number)
            except InputError as exc:
                yield PageImage(document, number, count, error=str(exc))
                continue
            except Exception as exc:  # a page tree that lies about its pages, a broken page object, ...
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                yield PageImage(document, number, count, error=f"{document.path} page {number}: cannot render ({reason})")
                continue
            yield PageImage(document, number, count, image=image, render_s=time.perf_counter() - started)


def _video_pages(document: Document, pages: set[int], max_pixels: int, fps: float) -> Iterator[PageImage]:
    """A video's kept frames among ``pages``, decoded as they come; the page after the last good
    frame fails with the reason when the video breaks off. ``page_count`` is left 0: the planner
    counted the pages, and the count is only known here once the whole video is decoded."""
    started = time.perf_counter()
    for item in video.iter_frames(document.path, pages, fps):
        if isinstance(item, video.VideoBroken):
            if item.kept + 1 in pages:
                yield PageImage(document, item.kept + 1, 0, error=str(item))
            return
        image = _fit(item.image(), max_pixels)
        yield PageImage(document, item.page, 0, image=image, render_s=time.perf_counter() - started,
                        timestamp_s=item.timestamp_s)
        started = time.perf_counter()
