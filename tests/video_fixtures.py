"""Recordings for the video tests, written with PyAV: synthetic slides held for seconds, with noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import document_image

SIZE = (320, 240)


def write_video(path: Path, frames, fps: int = 5, codec: str = "mpeg4") -> None:
    """A video of ``frames`` (H×W×3 uint8 arrays, streamed), ``fps`` frames a second."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 2_000_000
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def noisy(slide: np.ndarray, count: int, rng: np.random.Generator, noise: float = 8.0):
    """``count`` frames of ``slide``, each with fresh Gaussian noise (σ ``noise`` grey levels), as a camera
    or a screen capture's scaling adds."""
    for _ in range(count):
        yield np.clip(slide.astype(np.int16) + rng.normal(0, noise, slide.shape), 0, 255).astype(np.uint8)


def slide_image(number: int) -> np.ndarray:
    return np.asarray(document_image(*SIZE, seed=50 + number))


def write_slides_video(path: Path, holds: list[float], fps: int = 5, codec: str = "mpeg4", seed: int = 0) -> list[float]:
    """A recording of ``len(holds)`` different slides, each on screen ``holds[i]`` seconds, with noise;
    returns the time each slide appears."""
    rng = np.random.default_rng(seed)
    counts = [round(hold * fps) for hold in holds]
    frames = (frame for number, count in enumerate(counts) for frame in noisy(slide_image(number + 10 * seed),
                                                                               count, rng))
    write_video(path, frames, fps, codec)
    return [sum(counts[:i]) / fps for i in range(len(counts))]


def truncate(path: Path, keep: float) -> None:
    """Cut the file to its first ``keep`` share of bytes, as an interrupted copy or download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def write_unknown_codec_video(path: Path) -> None:
    """An AVI whose stream's FourCC (QQQQ) names no codec FFmpeg knows."""
    write_slides_video(path, [1.0], codec="mpeg4")
    path.write_bytes(path.read_bytes().replace(b"FMP4", b"QQQQ"))
