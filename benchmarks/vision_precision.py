"""The fastest vision precision on this CPU, and whether ``--vision-dtype auto``'s probe finds it.

    python benchmarks/vision_precision.py --model /tmp/full --out benchmarks/results/vision-precision-NAME.json

For float32, bfloat16 and int8, in one run on one machine:

- the whole vision encoder (tower and projector) at three block sizes, the
  pipeline's block minimum (112,896 pixels), a mid-size block and the 1.5/1.6
  maximum (1,003,520 pixels): seconds per block, best of ``--runs`` after a
  warm-up, each dtype in a fresh process;
- ``--vision-dtype auto``'s probe (:func:`ocrbatch.model.precision.probe_seconds`)
  for each dtype, to show it orders them as the whole encoder does;
- teacher-forced top-1 agreement with the exact pipeline (float32 vision, F32
  GGUF) of bfloat16 and int8 embeddings on bench.py's synthetic pages
  (bench.py's fidelity child): ``auto``'s candidates are the precisions that
  agree at least as well as int8.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench
from bench import add_common_arguments, child_if_asked, machine_info, make_pages, run_child, write_results

DTYPES = ("float32", "bfloat16", "int8")
# Width x height of each block size: the pipeline's block minimum, a paragraph-sized block, the maximum.
BLOCK_SIZES = ((336, 336), (1008, 336), (1288, 756))


def child_encoder(spec: dict) -> dict:
    """The whole encoder in one dtype: seconds per block for each size, and the probe's seconds."""
    import torch
    from PIL import Image

    from ocrbatch.layout.blocks import BLOCK_MAX_PIXELS, BLOCK_MIN_PIXELS
    from ocrbatch.model.precision import probe_seconds
    from ocrbatch.model.vision import VisionEncoder

    torch.set_num_threads(spec["threads"])
    encoder = VisionEncoder(spec["model"], dtype=spec["dtype"])
    bounds = (BLOCK_MIN_PIXELS, BLOCK_MAX_PIXELS)  # as the layout stage resizes its blocks
    sizes = {}
    for width, height in BLOCK_SIZES:
        image = Image.new("RGB", (width, height), "white")
        times = []
        for run in range(spec["runs"] + 1):
            started = time.perf_counter()
            encoder.encode([image], bounds)
            if run:  # the first run warms up (and, for int8, compiles for this shape)
                times.append(time.perf_counter() - started)
        sizes[f"{width}x{height}"] = {"patches": encoder.n_patches_for(width, height, bounds),
                                      "best_s": round(min(times), 3), "runs_s": [round(t, 3) for t in times]}
    probe = probe_seconds(encoder.weights.config.vision_config, spec["dtype"])
    return {"encoder_s_per_block": sizes, "probe_s": round(probe, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Model folder (the full-size one: timings need its shapes).")
    parser.add_argument("--runs", type=int, default=2, help="Timed runs per block size after the warm-up.")
    parser.add_argument("--tokens", type=int, default=64, help="Forced output tokens per page (agreement).")
    parser.add_argument("--skip-agreement", action="store_true")
    add_common_arguments(parser)
    args = parser.parse_args()
    if child_if_asked(args, {"encoder": child_encoder}):
        return
    if not args.model:
        parser.error("--model is required")
    results: dict = {"machine": machine_info(), "settings": {"model": args.model, "threads": args.threads,
                                                             "runs": args.runs, "block_sizes": BLOCK_SIZES},
                     "notes": args.note}
    base = {"model": args.model, "threads": args.threads, "runs": args.runs}
    results["dtypes"] = {dtype: run_child("encoder", {**base, "dtype": dtype}, script=__file__) for dtype in DTYPES}
    timed = {d: r for d, r in results["dtypes"].items() if "error" not in r}
    results["fastest"] = {
        "whole_encoder_at_each_size": {size: min(timed, key=lambda d: timed[d]["encoder_s_per_block"][size]["best_s"])
                                       for size in next(iter(timed.values()))["encoder_s_per_block"]},
        "probe": min(timed, key=lambda d: timed[d]["probe_s"]),
    }
    results["vs_float32"] = {
        dtype: {size: round(timed["float32"]["encoder_s_per_block"][size]["best_s"] / value["best_s"], 3)
                for size, value in timed[dtype]["encoder_s_per_block"].items()}
        for dtype in timed}
    if not args.skip_agreement:
        with tempfile.TemporaryDirectory() as scratch:
            pages = [str(p) for p in make_pages(Path(scratch), 4, 448)]
            results["agreement"] = run_child("fidelity", {
                "model": args.model, "tokens": args.tokens, "threads": args.threads, "quants": [],
                "vision_dtypes": ["bfloat16", "int8"], "pages": pages}, script=bench.__file__)
    write_results(results, args.out)


if __name__ == "__main__":
    main()
