"""Video files as documents: frames sampled at ``--video-fps``, near-duplicates dropped.

Recordings (lectures, screen captures, filmed slide decks) are decoded with PyAV, whose wheels
bundle FFmpeg's libraries: every common codec (H.264, HEVC, VP8/9, AV1, MPEG-4, ProRes, MJPEG…)
without a system FFmpeg, on Linux, macOS and Windows alike.

A video's pages are its *kept* frames, in order. The first frame of each ``1 / fps`` interval is
sampled; a sample is kept when it differs from the last kept frame, so a slide that stays on
screen for three minutes is one page, timestamped when it appeared.

The duplicate rule: both frames are shrunk (area-averaged) to a :data:`GRID` × :data:`GRID`
grey thumbnail; a cell *changed* when its grey level moved by more than :data:`CELL_CHANGE` (of
255); the sample is a new page when at least :data:`CHANGED_SHARE` of the cells changed.
Averaging each cell over its pixels (about 19 at 320×240, 500 at 1080p) all but removes camera
noise and compression artefacts: frames of one slide with noise of σ = 8 levels per pixel, encoded
as MPEG-4 at 320×240, differ by at most 6 levels in any cell (measured, tests/test_video.py),
while a new line of text darkens dozens of cells by far more than 12 levels, and a new slide
changes about half of them; a mouse pointer or a blinking caret covers a few cells, under the
0.5 % (20 cells of 4,096). Comparing with the last *kept* frame rather than
the previous sample means a slow build-up (a fade, a diagram drawn stroke by stroke) still makes a
new page once it adds up.

Frames are streamed: one decoded frame and one thumbnail are held at a time, whatever the length.
Decoding is deterministic, so the planner (which counts the pages) and the renderer (which
yields them) pick the same frames. A video that breaks off (truncated, corrupt) keeps the frames
before the break and has one more page, which fails with the reason; one whose decoding stops
early without an error (a truncated Matroska file does) is caught by comparing the last frame's
time with the duration the container declares.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputError
from ..storage import ObjectPath

DEFAULT_VIDEO_FPS = 1.0
# The duplicate rule (see the module's docstring).
GRID = 64
CELL_CHANGE = 12
CHANGED_SHARE = 0.005
# A video whose last frame lies this much (or two frame intervals, if longer) before its declared end broke off.
TRUNCATION_TOLERANCE_S = 1.0
# FFmpeg's warning when it opens a stream it has no decoder for: "(Video: none (QQQQ / 0x51515151), ...".
_CODEC_IN_LOG = re.compile(r"\(Video: ([^,]+)")


class VideoBroken(InputError):
    """Decoding stopped before the end of the video; the ``kept`` frames before it were yielded."""

    def __init__(self, message: str, kept: int):
        super().__init__(message)
        self.kept = kept


@dataclass(frozen=True)
class VideoFrame:
    page: int  # 1-based among the kept frames
    timestamp_s: float  # from the start of the video
    frame: object  # the decoded av.VideoFrame

    def image(self):
        return self.frame.to_image()


@dataclass(frozen=True)
class VideoSurvey:
    """What a run would make of a video: its pages, and why it broke off if it did."""

    duration_s: float | None
    sampled: int
    kept: int
    error: str | None = None

    @property
    def page_count(self) -> int:
        return self.kept + (1 if self.error else 0)


def _open(path: Path):
    import av
    import av.logging

    # FFmpeg says which codec it lacks only in its log, which PyAV silences unless asked, and in which
    # it drops a line repeating the previous one (the second file in one codec would go unnamed).
    previous, skip_repeated = av.logging.get_level(), av.logging.get_skip_repeated()
    av.logging.set_level(av.logging.WARNING)
    av.logging.set_skip_repeated(False)
    try:
        with av.logging.Capture() as logs:
            # An object in storage is read through its fsspec file, in ranges as FFmpeg seeks; the
            # container does not close it: fsspec closes a file when it is collected with the container.
            container = av.open(path.open() if isinstance(path, ObjectPath) else str(path))
    except av.FFmpegError as exc:
        raise InputError(f"{path}: not a readable video ({exc.strerror or exc})") from None
    finally:
        av.logging.set_level(previous)
        av.logging.set_skip_repeated(skip_repeated)
    if not container.streams.video:
        container.close()
        raise InputError(f"{path}: the file has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        named = [match.group(1) for _, _, line in logs if (match := _CODEC_IN_LOG.search(line))]
        container.close()
        codec = named[0] if named else "of unknown kind"
        raise InputError(f"{path}: unsupported video codec {codec}: FFmpeg {av.ffmpeg_version_info} "
                         f"(PyAV {av.__version__}) has no decoder for it")
    stream.thread_type = "AUTO"
    return container, stream


def _duration_s(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return container.duration / 1_000_000 if container.duration else None


def _thumbnail(frame) -> np.ndarray:
    return frame.reformat(width=GRID, height=GRID, format="gray", interpolation="AREA").to_ndarray().astype(np.int16)


def is_new_page(thumbnail: np.ndarray, last_kept: np.ndarray | None) -> bool:
    """The duplicate rule: enough cells of the thumbnail moved far enough from the last kept one."""
    if last_kept is None:
        return True
    changed = np.abs(thumbnail - last_kept) > CELL_CHANGE
    return changed.mean() >= CHANGED_SHARE


def _kept_frames(path: Path, fps: float, stats: dict | None = None) -> Iterator[VideoFrame]:
    """The kept frames of ``path``; raises :class:`VideoBroken` after the last good one if it breaks off.

    ``stats``, if given, gets the survey's figures: ``duration_s`` and, at the end, ``sampled``.
    """
    import av

    container, stream = _open(path)
    try:
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        duration = _duration_s(container, stream)
        if stats is not None:
            stats["duration_s"] = duration
        interval = 1 / float(stream.average_rate) if stream.average_rate else 0.0
        last_sample, last_time, last_kept, kept, sampled = -1, None, None, 0, 0
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                time = frame.time - start
                last_time = time
                sample = int(np.floor(time * fps + 1e-6))
                if sample <= last_sample:
                    continue
                last_sample = sample
                sampled += 1
                thumbnail = _thumbnail(frame)
                if is_new_page(thumbnail, last_kept):
                    last_kept, kept = thumbnail, kept + 1
                    yield VideoFrame(kept, round(time, 3), frame)
        except av.FFmpegError as exc:
            where = f"{last_time:.1f} s" if last_time is not None else "its start"
            raise VideoBroken(f"{path}: the video breaks off after {where} ({exc.strerror or exc}); "
                              f"the {kept} pages before it were kept", kept) from None
        finally:
            if stats is not None:
                stats["sampled"] = sampled
        if duration and (last_time is None or last_time < duration - max(TRUNCATION_TOLERANCE_S, 2 * interval)):
            where = f"{last_time:.1f} s" if last_time is not None else "its start"
            raise VideoBroken(f"{path}: the video ends after {where} of the {duration:.1f} s it declares "
                              f"(truncated?); the {kept} pages before it were kept", kept)
    finally:
        container.close()


def survey(path: Path, fps: float = DEFAULT_VIDEO_FPS) -> VideoSurvey:
    """Decode the whole video once and count the pages it gives (none held).

    Raises :class:`InputError` when not one frame can be read: the video fails as a document.
    """
    kept, error, stats = 0, None, {}
    try:
        for frame in _kept_frames(path, fps, stats):
            kept = frame.page
    except VideoBroken as exc:
        if not exc.kept:
            raise InputError(str(exc)) from None
        error = str(exc)
    if not kept:
        raise InputError(f"{path}: the video has no frames")
    return VideoSurvey(stats["duration_s"], stats["sampled"], kept, error)


def iter_frames(path: Path, pages: set[int], fps: float = DEFAULT_VIDEO_FPS) -> Iterator[VideoFrame | VideoBroken]:
    """The kept frames numbered in ``pages``, streamed; the break itself comes last if the video breaks off."""
    try:
        for frame in _kept_frames(path, fps):
            if frame.page in pages:
                yield frame
    except VideoBroken as exc:
        yield exc
