"""The job's own ceiling: pages/s of everything but the model, over many tiny pages.

At 1–2.5 pages/s per GPU (PaddleOCR-VL on one A100/H800 with vLLM or
FastDeploy), a fleet of GPUs asks the driver, the checkpoint and the output
writer for the sum of those rates. This benchmark takes the model out: the
batch job (local engine, ``--backend openai``) runs over N one-colour 64×64
PNG pages against the tests' OpenAI-compatible stub server on loopback,
which answers at once, in its own process (so its threads and memory are not
the job's). The stub reports pixel bounds that leave a 64×64 page near its
size, so the per-page image work (resize, PNG, base64) is that of a tiny
image and what is measured is the job's fixed cost per page: discovery and
content ids, planning, the render process, the HTTP client, the checkpoint
commit and the output row.

Reported per N: pages/s of the whole run and of its processing phase (after
planning), the parent's RSS as pages are done (at 10/25/50/75/100 %, by a
sampling thread that counts finished pages in the checkpoint), its CPU
seconds per page, the checkpoint's size, the time to write the N output rows
(the job's writer fed from the checkpoint, as every run rebuilds its output),
the re-run with nothing to do, and the fleet the pages/s allow.

``--engines local ray`` also runs the same pages through ``--engine ray
--backend openai`` against the same stub: a fresh local Ray instance whose
``--ray-actors`` actors (default: this machine's cores, one CPU each) render
the pages and send them to the stub, the driver writing the Parquet dataset.
The same figures where they apply: the parent is the driver (Ray's own
processes are not in its RSS), pages are counted done as their rows reach
it, and its processing phase starts at the first row (``first_row_s``, which
includes starting Ray and its actors); the dataset's size stands for the
checkpoint's, and there is no output rewrite (the dataset is the record).

    python benchmarks/ceiling.py --pages 10000 100000 --out benchmarks/results/ceiling-cpu-2core.json
    python benchmarks/ceiling.py --quick
    python benchmarks/ceiling.py --pages 1000 --engines local ray
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from bench import write_results  # helpers in the same folder

from ocrbatch.engines.local import run_job
from ocrbatch.job.options import JobOptions
from ocrbatch.records.output import open_output
from ocrbatch.records.sqlite import Store

TESTS = Path(__file__).parents[1] / "tests"
# Pages/s per GPU of PaddleOCR-VL served by vLLM or FastDeploy on one A100/H800 (issue 24).
GPU_PAGES_PER_S = (1.0, 2.5)
FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)
PAGES_PER_FOLDER = 1000  # as an inbox of many folders, not one folder of 100,000 files
# Bounds the stub reports: a 64×64 page is sent at 56×56 (multiples of 28), not upscaled to the
# 112,896-pixel minimum of a real model, so the image work per page stays that of a tiny page.
STUB_PIXEL_BOUNDS = (784, 1003520)
SAMPLE_EVERY_S = 0.25
MB = 1 << 20


def make_pages(folder: Path, count: int) -> None:
    """``count`` distinct 64×64 PNG pages (distinct content: copies would be decoded once)."""
    from PIL import Image

    for index in range(count):
        sub = folder / f"{index // PAGES_PER_FOLDER:05d}"
        if index % PAGES_PER_FOLDER == 0:
            sub.mkdir(parents=True, exist_ok=True)
        colour = (index & 0xFF, (index >> 8) & 0xFF, (index >> 16) & 0xFF)
        Image.new("RGB", (64, 64), colour).save(sub / f"page-{index:06d}.png", compress_level=1)


def serve() -> None:
    """The stub server's process: prints its URL, answers until stdin closes."""
    sys.path.insert(0, str(TESTS))
    from fault_server import FaultServer, Ok

    class InstantServer(FaultServer):
        """Answers every request at once and keeps no record of it (100,000 bodies would fill memory)."""

        def _arrive(self, prompt: str, body: dict):
            return Ok()

        def _leave(self) -> None:
            pass

    with InstantServer(pixel_bounds=STUB_PIXEL_BOUNDS) as server:
        print(server.url, flush=True)
        sys.stdin.read()


class Stub:
    """The stub server in a child process."""

    def __enter__(self) -> Stub:
        self.process = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.url = self.process.stdout.readline().strip()
        if not self.url:
            raise RuntimeError("the stub server did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


class CheckpointCount:
    """The pages ok so far in the local engine's checkpoint, read-only (the Sampler's ``done``)."""

    def __init__(self, checkpoint: Path):
        self.checkpoint = checkpoint
        self.db = None

    def __call__(self) -> int:
        if self.db is None and self.checkpoint.is_file():
            self.db = sqlite3.connect(f"file:{self.checkpoint}?mode=ro", uri=True, check_same_thread=False)
        if self.db is None:
            return 0
        try:
            return self.db.execute("SELECT COUNT(*) FROM pages WHERE status = 'ok'").fetchone()[0]
        except sqlite3.OperationalError:  # the tables are not made yet
            return 0

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


class Sampler(threading.Thread):
    """Samples this process's RSS with the pages finished so far (as ``done()`` counts them)."""

    def __init__(self, done: Callable[[], int]):
        super().__init__(daemon=True)
        self.done = done
        self.samples: list[tuple[float, int, int]] = []  # (seconds, pages done, RSS bytes)
        self.halt = threading.Event()

    def run(self) -> None:
        me, started = psutil.Process(), time.monotonic()
        while not self.halt.wait(SAMPLE_EVERY_S):
            self.samples.append((time.monotonic() - started, self.done(), me.memory_info().rss))

    def stop(self) -> list[tuple[float, int, int]]:
        self.halt.set()
        self.join()
        return self.samples


def _at_fractions(samples: list[tuple[float, int, int]], pages: int, final_rss: int) -> dict:
    """RSS (MB) when 10/25/50/75/100 % of the pages were done; 100 % is the RSS as the run returned."""
    rss = {}
    for fraction in FRACTIONS[:-1]:
        reached = [sample for sample in samples if sample[1] >= fraction * pages]
        rss[f"{fraction:.0%}"] = round(reached[0][2] / MB, 1) if reached else None
    rss["100%"] = round(final_rss / MB, 1)
    return rss


def timed_pages(work: Path, count: int) -> float:
    """Seconds to make ``count`` pages under ``work``/docs."""
    begin = time.perf_counter()
    make_pages(work / "docs", count)
    return round(time.perf_counter() - begin, 1)


def rerun_seconds(rerun, pages: int, out: Path) -> float:
    """How long the re-run took, which must have found all ``pages`` done."""
    if rerun.pages_ok or rerun.pages_skipped != pages:
        raise RuntimeError(f"the re-run did work: {rerun.line(out)}")
    return round(rerun.elapsed_s, 2)


def job_options(work: Path, out: Path, url: str, concurrency: int, **options) -> JobOptions:
    """The job both engines run over ``work``'s pages; ``options`` go to :class:`JobOptions`."""
    return JobOptions(paths=[work / "docs"], out=out, backend="openai", base_url=url, layout="none",
                      concurrency=concurrency, min_file_age=0, progress=False, max_tokens=16, **options)


def observed(pages: int, run: Callable, done: Callable[[], int], out: Path) -> tuple[object, dict]:
    """``run()``'s summary and the figures both engines report: pages/s, this (the parent) process's CPU and RSS."""
    me = psutil.Process()
    sampler = Sampler(done)
    cpu_before, rss_before = me.cpu_times(), me.memory_info().rss
    sampler.start()
    summary = run()
    rss_after = me.memory_info().rss
    samples = sampler.stop()
    cpu_after = me.cpu_times()
    if summary.pages_ok != pages:
        raise RuntimeError(f"{summary.pages_ok} of {pages} pages ok: {summary.line(out)}")
    first = next(t for t, count, _ in samples if count > 0)  # planning ends about when the first page lands
    cpu_s = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    pages_per_s = pages / summary.elapsed_s
    return summary, {
        "pages": pages,
        "run_s": round(summary.elapsed_s, 2),
        "pages_per_s": round(pages_per_s, 1),
        "first_page_s": round(first, 1),
        "processing_pages_per_s": round(pages / (summary.elapsed_s - first), 1),
        "parent_cpu_ms_per_page": round(1000 * cpu_s / pages, 3),
        "parent_rss_mb_before": round(rss_before / MB, 1),
        "parent_rss_mb_at_done": _at_fractions(samples, pages, rss_after),
        "parent_rss_mb_peak": round(max([rss for _, _, rss in samples] + [rss_after]) / MB, 1),
        "fleet_gpus": {f"at {rate:g} pages/s per GPU": int(pages_per_s // rate) for rate in GPU_PAGES_PER_S},
    }


def measure(pages: int, url: str, concurrency: int, **options) -> dict:
    """The local engine: one run over ``pages`` new pages, its re-run and the output rewrite."""
    with tempfile.TemporaryDirectory(prefix="ceiling-") as work:
        work = Path(work)
        made_s = timed_pages(work, pages)
        out = work / "results.parquet"
        options = job_options(work, out, url, concurrency, **options)
        count = CheckpointCount(options.checkpoint_path)
        try:
            summary, figures = observed(pages, lambda: run_job(options), count, out)
        finally:
            count.close()
        checkpoint_bytes = sum(path.stat().st_size for path in work.glob("results.parquet.ocrbatch.db*"))

        rerun_s = rerun_seconds(run_job(options), pages, out)

        store = Store(options.checkpoint_path, readonly=True)
        writer = open_output(work / "rewrite.parquet")
        begin = time.perf_counter()
        batch = []
        for row in store.rows():
            batch.append(row)
            if len(batch) >= 1024:
                writer.write(batch)
                batch = []
        writer.write(batch)
        writer.commit()
        write_s = time.perf_counter() - begin
        store.close()

    figures["plan_s_approx"] = figures.pop("first_page_s")
    return {
        "engine": "local", "make_pages_s": made_s, **figures,
        "checkpoint_mb": round(checkpoint_bytes / MB, 2),
        "checkpoint_bytes_per_page": round(checkpoint_bytes / pages),
        "output_write_s": round(write_s, 2),
        "rerun_s": rerun_s,
    }


def measure_ray(pages: int, url: str, concurrency: int, actors: int, **options) -> dict:
    """``--engine ray``: one run over ``pages`` new pages on a fresh local Ray instance, and its re-run."""
    # Ray on loopback only (as the tests run it), reporting nothing to its makers: read as Ray is imported.
    os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"})
    from ocrbatch.engines.ray import RaySettings, run_ray_job

    settings = RaySettings(vision_actors=actors)
    with tempfile.TemporaryDirectory(prefix="ceiling-ray-") as work:
        work = Path(work)
        made_s = timed_pages(work, pages)
        out = work / "dataset"
        options = job_options(work, out, url, concurrency, **options)
        rows = []  # the rows as they reach the driver; counted by the sampler

        def run():
            return run_ray_job(options, settings=settings, on_row=lambda row: rows.append(None))

        summary, figures = observed(pages, run, rows.__len__, out)
        dataset_bytes = sum(path.stat().st_size for path in out.glob("*.parquet"))
        rerun_s = rerun_seconds(run_ray_job(options, settings=settings), pages, out)
    figures["first_row_s"] = figures.pop("first_page_s")
    return {
        "engine": "ray", "ray_actors": actors, "make_pages_s": made_s, **figures,
        "lost_pages": summary.lost_pages,
        "dataset_mb": round(dataset_bytes / MB, 2),
        "dataset_bytes_per_page": round(dataset_bytes / pages),
        "rerun_s": rerun_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--quick", action="store_true", help="10,000 pages only (for CI).")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="requests in flight to the stub (--concurrency; with ray, per actor)")
    parser.add_argument("--engines", nargs="+", choices=("local", "ray"), default=["local"],
                        help="The engines to run, each over every --pages count (default: local).")
    parser.add_argument("--ray-actors", type=int, default=os.cpu_count(),
                        help="--engine ray: the actors that render and send pages, one CPU each (default: the cores).")
    parser.add_argument("--note", action="append", default=[], help="A note to store in the results (repeatable).")
    parser.add_argument("--out", type=Path, help="Also write the results (JSON) here.")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the stub's own process
    args = parser.parse_args()
    if args.serve:
        return serve()
    counts = [10000] if args.quick else args.pages
    results = {"settings": {"engine": " ".join(args.engines), "backend": "openai (stub on loopback, instant answers)",
                            "page": "64x64 one-colour PNG", "concurrency": args.concurrency, "quick": args.quick,
                            "gpu_pages_per_s": GPU_PAGES_PER_S},
               "machine": {"cores": os.cpu_count(), "load_average_before": os.getloadavg()},
               "runs": [], "date": time.strftime("%Y-%m-%d"), "notes": args.note}
    with Stub() as stub:
        for engine in args.engines:
            for count in counts:
                if engine == "local":
                    results["runs"].append(measure(count, stub.url, args.concurrency))
                else:
                    results["runs"].append(measure_ray(count, stub.url, args.concurrency, args.ray_actors))
                print(results["runs"][-1], file=sys.stderr, flush=True)
    results["machine"]["load_average_after"] = os.getloadavg()
    write_results(results, args.out)


if __name__ == "__main__":
    main()
