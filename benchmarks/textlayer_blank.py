"""Seconds for the text-layer route to take a 1,000-page blank PDF, as the render process takes it.

A blank page (nothing drawn on it) is known from its drawing operations and
skips pymupdf4llm: each should cost about a millisecond, where writing its
Markdown cost 0.18 s (544 s for 3,000 pages on 2 cores). The target, for
the whole document with ``--pdf-text auto``: under 5 seconds on 2 busy
cores, pages judged, routed and given their (empty) Markdown.

    python benchmarks/textlayer_blank.py --out benchmarks/results/textlayer-blank.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import write_results  # helpers in the same folder

from ocrbatch.sources.textlayer import iter_routes

TARGET_S = 5.0


def measure(pages: int) -> dict:
    import pymupdf

    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "blank.pdf"
        with pymupdf.open() as pdf:
            for _ in range(pages):
                pdf.new_page()
            pdf.save(path)
        begin = time.perf_counter()
        routes = list(iter_routes(path, range(1, pages + 1), "auto"))
        elapsed = time.perf_counter() - begin
    assert all(chosen.source == "text-layer" and chosen.markdown == "" for _, chosen in routes), routes[:3]
    return {"pages": pages, "seconds": round(elapsed, 3), "ms_per_page": round(1000 * elapsed / pages, 3),
            "target_s": TARGET_S, "within_target": elapsed < TARGET_S, "cores": os.cpu_count(),
            "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=1000)
    parser.add_argument("--note", action="append", default=[], help="A note to store in the results (repeatable).")
    parser.add_argument("--out", type=Path, help="Also write the results (JSON) here.")
    args = parser.parse_args()
    results = measure(args.pages)
    results["notes"] = args.note
    write_results(results, args.out)


if __name__ == "__main__":
    main()
