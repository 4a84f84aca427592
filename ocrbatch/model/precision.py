"""``--vision-dtype auto``: the fastest vision precision on this machine, measured once and remembered.

Which precision encodes fastest depends on the CPU: int8 matrix multiplies
use VNNI where the CPU has it, bfloat16 ones AMX where it has that, and
without either float32 may be the fastest. So the choice is measured, not
guessed from CPU flags: a one-layer vision tower with the model's own
shapes (random weights: timing does not depend on their values) encodes one
page-sized image in each candidate precision, compiled as the encoder runs
it, and the fastest wins. The result is remembered in the cache folder per
CPU, torch version, thread count and vision shape, so the probe (a few
seconds; int8 compiles) runs once per machine.

Only precisions that agree with float32 at least as well as int8 take part.
int8's teacher-forced top-1 agreement was 100 % with a full-size random model
whose output projection is its embedding matrix
(``benchmarks/results/cpu-2core-full.json``); with the release-shaped one (an
``lm_head`` of its own, whose random logits have thin margins) it was 66 %,
bfloat16's 94 % (``benchmarks/results/vision-precision-amx-cpu-2core.json``;
on the tiny model 93 % and 98 %). So ``auto`` is exact only where float32 is
the fastest. On a GPU ``auto`` is bfloat16, as ``configs/gpu.toml``, without
a probe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..machine.llama_build import cpu_info

log = logging.getLogger(__name__)

AUTO = "auto"
CPU_CANDIDATES = ("float32", "bfloat16", "int8")  # bfloat16 agreed with float32 better than int8 (see above)
GPU_CHOICE = "bfloat16"
PROBE_LAYERS = 1
PROBE_SIZE = (644, 448)  # a block-sized image: 1,472 patches, 368 language-model tokens
PROBE_RUNS = 2
CACHE_NAME = "vision-precision.json"


@dataclass(frozen=True)
class PrecisionChoice:
    dtype: str
    seconds: dict[str, float]  # the probe's time per candidate (empty: no probe)
    reason: str


def choose_precision(vision_config, device: str, threads: int, cache: Path,
                     measure: Callable[[object, str], float] | None = None) -> PrecisionChoice:
    """The precision ``auto`` means for this model's vision tower on ``device``, with ``threads`` torch threads.

    ``measure(vision_config, dtype)`` times one candidate (default: :func:`probe_seconds`).
    """
    if device != "cpu":
        return PrecisionChoice(GPU_CHOICE, {}, f"{GPU_CHOICE} on {device}")
    key = _machine_key(vision_config, threads)
    remembered = _read_cache(cache).get(key)
    if remembered and set(remembered["seconds"]) == set(CPU_CANDIDATES):
        seconds = remembered["seconds"]
        return PrecisionChoice(remembered["dtype"], seconds, f"measured on this machine before: {_listing(seconds)}")
    measure = measure or probe_seconds
    seconds = {dtype: measure(vision_config, dtype) for dtype in CPU_CANDIDATES}
    fastest = min(seconds, key=seconds.get)
    _write_cache(cache, key, {"dtype": fastest, "seconds": seconds, "cpu": cpu_info()[0], "threads": threads})
    return PrecisionChoice(fastest, seconds, f"measured now: {_listing(seconds)}")


def probe_seconds(vision_config, dtype: str) -> float:
    """Seconds to encode one :data:`PROBE_SIZE` image through a :data:`PROBE_LAYERS`-layer tower in ``dtype``.

    The best of :data:`PROBE_RUNS` runs after a first one that warms up (and, for int8, compiles).
    """
    import torch

    from .vision import build_tower

    config = vision_config.__class__.from_dict({**vision_config.to_dict(), "num_hidden_layers": PROBE_LAYERS})
    visual = build_tower(config, dtype)
    patch = config.patch_size
    grid = (1, PROBE_SIZE[1] // patch, PROBE_SIZE[0] // patch)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, grid[1] * grid[2], config.num_channels, patch, patch, generator=generator)
    pixels = pixels.to(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    grid_thw = torch.tensor([grid])
    best = float("inf")
    with torch.inference_mode():
        for run in range(PROBE_RUNS + 1):
            started = time.perf_counter()
            visual(pixel_values=pixels, grid_thw=grid_thw)
            if run:  # the first run warms up
                best = min(best, time.perf_counter() - started)
    return best


def _listing(seconds: dict[str, float]) -> str:
    return ", ".join(f"{dtype} {value:.3f} s" for dtype, value in sorted(seconds.items(), key=lambda kv: kv[1]))


def _machine_key(vision_config, threads: int) -> str:
    """What the fastest precision depends on: the CPU (name and features), torch, threads, the tower's shape."""
    import torch

    shape = (vision_config.hidden_size, vision_config.intermediate_size, vision_config.num_attention_heads,
             vision_config.patch_size)
    cpu, features = cpu_info()
    text = "\n".join([cpu, " ".join(sorted(features)), torch.__version__, str(threads), repr(shape)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_cache(cache: Path) -> dict:
    try:
        return json.loads((cache / CACHE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measure again


def _write_cache(cache: Path, key: str, entry: dict) -> None:
    """Add ``entry`` under ``key``, atomically: two processes measuring at once leave one whole file."""
    entries = {**_read_cache(cache), key: entry}
    cache.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=cache, prefix=f".{CACHE_NAME}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(entries, out, indent=1, sort_keys=True)
        os.replace(tmp, cache / CACHE_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
