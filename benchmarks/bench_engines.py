"""Pages/min of the batch job's engines and backends on the same report pages, side by side in one run.

Every mode runs the real job over the same folder of report PDFs (Letter and
A4 at ``configs/cpu.toml``'s 110 dpi and pixel cap, whole pages, every page to
the model, the same forced output length per page: end-of-sentence ignored),
each in its own process:

- ``local``: ``--engine local --backend local``, the model loaded in the job
  (its load is timed apart: ``process_s`` is the pages alone, ``wall_s`` the
  whole process);
- ``ray``: ``--engine ray`` on a fresh local Ray instance: start-up, actors
  loading the model and the pages are one figure, so compare its ``wall_s``
  with the local run's;
- ``ray-2-nodes``: the same on a two-node ``ray.cluster_utils.Cluster`` on this
  machine (both nodes share its cores: this measures the spread, not a gain);
- ``openai``: ``--backend openai`` against ``ocrbatch serve`` on loopback,
  started and warmed before the clock with the same quant and pool shape:
  compare its ``process_s`` with the local one's (the HTTP path's overhead),
  and the CPU seconds of client and server with the local job's.

The local and ray runs also note when their rows finished (their
``created_at``, stamped as a page's decoding settles) in seconds from the
process start and from the job's call, and their pages' vision seconds: the
pages are encoded in turn, so a first row finished well before the last (by
about the vision seconds of the pages after it) shows decoding under way while
pages are still being encoded. A page goes to decoding when the forward pass
holding it ends, so ``--max-batch-patches`` (patches a pass) decides how soon.

With two or more page counts (``--pages 2 6``) every mode runs at the largest,
reported as with one count, and ``local`` and ``ray`` (those of them in
``--modes``) also run at each smaller count (fresh folders, the same forced tokens per page: the largest count's).
``start_up`` then fits each one's whole-process seconds to
``wall_s = fixed_s + per_page_s * pages`` (least squares: exact with two
counts) and says from how many pages ray's fitted time is below local's
(``ray_pays_off_from_pages``; null, with a note, when ray's per-page time is
not below local's: then it never pays off on one machine).

    python benchmarks/bench_engines.py --model /tmp/full --pages 4 --out benchmarks/results/engines-cpu-2core.json
    python benchmarks/bench_engines.py --model /tmp/full --pages 2 6 --tokens 128 --modes local ray \\
        --out benchmarks/results/engines-start-up-cpu-2core.json   # from how many pages ray pays off
    python benchmarks/bench_engines.py --quick     # tiny model, 2 pages, 8 tokens: keeps the harness working
    python benchmarks/bench_engines.py --quick --pages 1 2 --modes local ray   # the start-up fit's harness
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).parent))
from bench import (  # helpers in the same folder
    CHARS_PER_TOKEN,
    ENGINE_SETTINGS,
    add_common_arguments,
    child_if_asked,
    cpu_seconds,
    machine_info,
    make_report_pages,
    peak_rss_mb,
    ratio,
    row_finish_times,
    run_child,
    tuning,
    write_results,
)

CPU_TOML = {"quant": "Q4_K_M", "vision_dtype": "float32", "dpi": 110, "max_pixels": 1254400, **ENGINE_SETTINGS}
MODES = ("local", "ray", "ray-2-nodes", "openai")


def job_options(spec: dict, out: Path, **extra):
    from ocrbatch.job.options import JobOptions

    return JobOptions(paths=[Path(spec["docs"])], out=out, model=spec["model"], quant=spec["quant"],
                      max_tokens=spec["tokens"], ignore_eos=True, workers=spec["workers"],
                      seqs_per_worker=spec["seqs"], batch_size=spec["batch_size"], vision_dtype=spec["vision_dtype"],
                      dpi=spec["dpi"], max_pixels=spec["max_pixels"], threads=spec["threads"], progress=False,
                      min_file_age=0, layout="none", pdf_text="never", **tuning(spec), **extra)


def page_figures(rows: list[dict]) -> dict:
    return {"pages": len(rows), "pages_ok": sum(r["status"] == "ok" for r in rows),
            "errors": [r["error"] for r in rows if r["error"]],
            "output_tokens_per_page": [r["n_output_tokens"] for r in rows],
            "image_tokens_per_page": sorted({r["n_image_tokens"] for r in rows if r["n_image_tokens"] is not None})}


def child_ray(spec: dict) -> dict:
    """``run_ray_job`` on a fresh local instance, or on a two-node cluster of this machine."""
    import psutil
    import pyarrow.dataset as ds

    from ocrbatch.engines.ray import RaySettings, run_ray_job

    process_start = psutil.Process().create_time()  # epoch seconds, as the rows' created_at

    # The vision actor gets as many threads as the local engine's encoder (--threads), each decode
    # actor one, as the local engine's workers.
    settings = RaySettings(vision_cpus=spec["threads"])
    cluster = None
    if spec["nodes"] > 1:
        from ray.cluster_utils import Cluster

        # The logical CPUs a local instance declares (every actor's plus one), shared by the nodes.
        needed = settings.vision_cpus + spec["workers"] * settings.decode_cpus + 1
        cpus = max(math.ceil(settings.vision_cpus), math.ceil(needed / spec["nodes"]))
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus})
        for _ in range(spec["nodes"] - 1):
            cluster.add_node(num_cpus=cpus)
        cluster.wait_for_nodes()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "dataset"
            job_start = time.time()
            begin = time.perf_counter()
            summary = run_ray_job(job_options(spec, out), address=cluster.address if cluster else None,
                                  settings=settings)
            elapsed_s = time.perf_counter() - begin
            rows = ds.dataset(out, format="parquet").to_table().to_pylist()
    finally:
        if cluster is not None:
            import ray

            ray.shutdown()
            cluster.shutdown()
    return {"run_s": elapsed_s, **page_figures(rows), "pages_per_min_run": len(rows) / elapsed_s * 60,
            "nodes": {stage: len(counts) for stage, counts in summary.nodes.items()},
            "pages_by_node": {stage: sorted(counts.values()) for stage, counts in summary.nodes.items()},
            "vision_s_per_page": sum(r["vision_s"] or 0 for r in rows) / max(1, len(rows)),
            "peak_rss_driver_mb": peak_rss_mb(), **row_finish_times(rows, process_start, job_start)}


def child_remote(spec: dict) -> dict:
    """``run_job`` with the OpenAI backend against the server at ``spec['base_url']``."""
    import pyarrow.parquet as pq

    from ocrbatch.engines.local import run_job

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "out.parquet"
        options = job_options(spec, out, backend="openai", base_url=spec["base_url"],
                              concurrency=spec["concurrency"])
        cpu_before = cpu_seconds([])
        begin = time.perf_counter()
        run_job(options)
        process_s = time.perf_counter() - begin
        cpu_s = cpu_seconds([]) - cpu_before  # this process and the render process
        rows = pq.read_table(out).to_pylist()
    return {"process_s": process_s, **page_figures(rows), "pages_per_min": len(rows) / process_s * 60,
            "client_cpu_s_per_page": cpu_s / len(rows), "peak_rss_client_mb": peak_rss_mb()}


CHILDREN = {"ray": child_ray, "remote": child_remote}


# -- the server ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by a process and its live descendants (the server and its workers)."""
    import psutil

    process = psutil.Process(pid)
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


class Server:
    """``ocrbatch serve`` in a subprocess, ready and warm when the ``with`` block starts."""

    def __init__(self, spec: dict, log: Path):
        self.port = free_port()
        command = [sys.executable, "-m", "ocrbatch", "serve", "--model", spec["model"], "--quant", spec["quant"],
                   "--vision-dtype", spec["vision_dtype"], "--workers", str(spec["workers"]),
                   "--seqs-per-worker", str(spec["seqs"]), "--port", str(self.port),
                   "--max-tokens-limit", str(max(4096, spec["tokens"]))]
        self.log = log.open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Self:
        import httpx
        from PIL import Image

        started = time.perf_counter()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ocrbatch serve exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.load_s = time.perf_counter() - started
        buffer = io.BytesIO()
        Image.new("RGB", (224, 224), "white").save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        model = httpx.get(f"{self.base_url}/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "OCR:"}]}]}
        httpx.post(f"{self.base_url}/chat/completions", json=body, timeout=600).raise_for_status()
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


# -- the run -------------------------------------------------------------------------------

def measure(args, work: Path) -> dict:
    import pymupdf

    from ocrbatch.model.gguf import convert

    if args.quick:
        args.pages, args.tokens = [min(count, 2) for count in args.pages], min(args.tokens or 8, 8)
    counts = sorted(set(args.pages))
    if counts[0] < 1:
        raise SystemExit("--pages: every count must be at least 1")
    if len(counts) > 1 and not {"local", "ray"} <= set(args.modes):
        raise SystemExit("--pages with two or more counts fits local against ray: give both in --modes")
    model = args.model
    if model is None:
        from ocrbatch.dev.model import make_model

        model = str(make_model(work / "tiny", size="tiny"))
    # The largest count is the main run (every mode, reported as with one count); each smaller one
    # gets its own fresh folder.
    folders = {count: work / ("pages" if count == counts[-1] else f"pages-{count}") for count in counts}
    made = {count: make_report_pages(folders[count], count, CPU_TOML["dpi"], CPU_TOML["max_pixels"])[0]
            for count in counts}
    pdfs = made[counts[-1]]
    chars = []
    for path in pdfs:
        with pymupdf.open(path) as doc:
            chars += [len(page.get_text()) for page in doc]
    tokens = args.tokens or round(sum(chars) / len(chars) / CHARS_PER_TOKEN)
    convert(model, CPU_TOML["quant"])  # cached: no mode pays for the conversion
    spec = {"model": model, "docs": str(work / "pages" / "docs"), "tokens": tokens, "threads": args.threads,
            **CPU_TOML, "max_batch_patches": args.max_batch_patches, "vision_dtype": args.vision_dtype}
    results: dict = {"machine": machine_info(), "settings": {
        "model": model, "quick": args.quick, "pages": len(chars), "papers": [p.stem for p in pdfs],
        "output_tokens_per_page": tokens, "threads": args.threads, **CPU_TOML,
        "max_batch_patches": args.max_batch_patches, "vision_dtype": args.vision_dtype, "layout": "none",
        "pdf_text": "never"}}
    fit_modes = [mode for mode in ("local", "ray") if mode in args.modes] if len(counts) > 1 else []
    if fit_modes:
        results["settings"]["page_counts"] = counts
        results["settings"]["page_counts_run_by"] = {mode: counts if mode in fit_modes else [counts[-1]]
                                                     for mode in args.modes}
    # The smaller counts first, smallest to largest, then the main run.
    smaller = {}
    for count in counts[:-1]:
        docs = str(folders[count] / "docs")
        for mode in fit_modes:
            smaller[(mode, count)] = run_mode(mode, {**spec, "docs": docs}, count, work)
    runs = {mode: run_mode(mode, spec, len(chars), work) for mode in args.modes}
    results["runs"] = runs
    local, ray1, ray2, remote = (runs.get(mode, {}) for mode in MODES)
    pages = len(chars)
    results["pages_per_min"] = {
        "local_pages_only": local.get("pages_per_min"),
        "local_whole_process": pages / local["wall_s"] * 60 if local.get("wall_s") else None,
        "ray_whole_process": pages / ray1["wall_s"] * 60 if ray1.get("wall_s") else None,
        "ray_2_nodes_whole_process": pages / ray2["wall_s"] * 60 if ray2.get("wall_s") else None,
        "openai_pages_only": remote.get("pages_per_min"),
    }
    per_min = results["pages_per_min"]
    results["ratios"] = {
        "ray_vs_local_whole_process": ratio(per_min["ray_whole_process"], per_min["local_whole_process"]),
        "ray_2_nodes_vs_ray_1_node": ratio(per_min["ray_2_nodes_whole_process"], per_min["ray_whole_process"]),
        "openai_vs_local_pages_only": ratio(per_min["openai_pages_only"], per_min["local_pages_only"]),
        "openai_cpu_s_per_page_vs_local": ratio(remote.get("cpu_s_per_page"), local.get("cpu_s_per_page")),
    }
    results["checks"] = {f"{mode}: every page decoded exactly the forced tokens":
                         run.get("output_tokens_per_page") == [tokens] * pages for mode, run in runs.items()}
    for (mode, count), run in smaller.items():
        results["checks"][f"{mode} at {count} pages: every page decoded exactly the forced tokens"] = run.get(
            "output_tokens_per_page") == [tokens] * count
    if fit_modes:
        wall = {mode: {count: smaller[(mode, count)] for count in counts[:-1]} | {counts[-1]: runs[mode]}
                for mode in fit_modes}
        results["start_up"] = start_up(wall, counts)
    results["notes"] = args.note
    return results


def run_mode(mode: str, spec: dict, pages: int, work: Path) -> dict:
    """One mode's run over ``spec['docs']`` (``pages`` pages), in a process of its own."""
    if mode == "local":
        return run_child("ocrbatch", {**spec, "pages_dir": spec["docs"], "layout": "none"})
    if mode.startswith("ray"):
        return run_child("ray", {**spec, "nodes": 2 if mode == "ray-2-nodes" else 1}, script=__file__)
    with Server(spec, work / "serve.log") as server:  # openai
        cpu_before = tree_cpu_s(server.process.pid)
        run = run_child("remote", {**spec, "base_url": server.base_url,
                                   "concurrency": spec["workers"] * spec["seqs"]}, script=__file__)
        run["server_cpu_s_per_page"] = (tree_cpu_s(server.process.pid) - cpu_before) / pages
        run["cpu_s_per_page"] = run["server_cpu_s_per_page"] + run.get("client_cpu_s_per_page", 0)
        run["server_load_s"] = server.load_s
    return run


def line_fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``y = fixed + per_page * x`` through ``points`` (two distinct x at least)."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    per_page = (sum((x - mean_x) * (y - mean_y) for x, y in points)
                / sum((x - mean_x) ** 2 for x, _ in points))
    return mean_y - per_page * mean_x, per_page


def start_up(wall: dict[str, dict[int, dict]], counts: list[int]) -> dict:
    """Each of local and ray's whole-process seconds by page count, fitted to a line; where ray's falls below."""
    section: dict = {"pages": counts, "fit": "wall_s = fixed_s + per_page_s * pages (least squares over the counts)"}
    fits = {}
    for mode, by_count in wall.items():
        failed = {count: run.get("error", "no wall_s") for count, run in by_count.items()
                  if "error" in run or not run.get("wall_s")}
        entry: dict = {"wall_s_by_pages": {str(count): run.get("wall_s") for count, run in by_count.items()}}
        if failed:
            entry["error"] = {str(count): error for count, error in failed.items()}
        else:
            points = [(count, by_count[count]["wall_s"]) for count in counts]
            fixed, per_page = line_fit(points)
            fits[mode] = (fixed, per_page)
            entry |= {"fixed_s": fixed, "per_page_s": per_page,
                      "max_residual_s": max(abs(y - fixed - per_page * x) for x, y in points)}
        # Whether decoding starts before every page is encoded: see the module's docstring.
        entry["rows_finished_by_pages"] = {str(count): {
            key.replace("_row_s_", "_s_"): by_count[count].get(key)
            for key in ("first_row_s_from_process_start", "last_row_s_from_process_start",
                        "first_row_s_from_job_start", "last_row_s_from_job_start", "vision_s_per_page")}
            for count in counts}
        section[mode] = entry
    if "local" not in fits or "ray" not in fits:
        missing = [mode for mode in ("local", "ray") if mode not in wall]
        section |= {"ray_extra_fixed_s": None, "ray_vs_local_per_page": None, "ray_pays_off_from_pages": None,
                    "note": f"no comparison: {' and '.join(missing)} not run" if missing
                    else "no fit: a local or ray run failed (see its error)"}
        return section
    (local_fixed, local_page), (ray_fixed, ray_page) = fits["local"], fits["ray"]
    extra = ray_fixed - local_fixed
    section["ray_extra_fixed_s"] = extra
    section["ray_vs_local_per_page"] = round(ray_page / local_page, 3) if local_page > 0 and ray_page > 0 else None
    notes = []
    if local_page <= 0 or ray_page <= 0:
        notes.append("a fitted per-page time is not positive: the page counts are too close together or the "
                     "runs too noisy (or the pages too cheap, as with --quick) for the fit to mean anything")
    if ray_page < local_page:
        # ray below local once extra + ray_page * n < local_page * n, i.e. n > extra / (local_page - ray_page)
        from_pages = max(1, math.floor(extra / (local_page - ray_page)) + 1)
        section["ray_pays_off_from_pages"] = from_pages
        notes.append(f"ray's fitted whole-process time is below local's from {from_pages} pages on "
                     f"(fixed {extra:+.0f} s, per page {ray_page - local_page:+.1f} s against local)")
        if from_pages > counts[-1]:
            notes.append(f"extrapolated beyond the largest count run ({counts[-1]} pages)")
    else:
        section["ray_pays_off_from_pages"] = None
        if extra < 0:
            # ray starts faster but falls behind: below local only up to the crossing
            until = math.ceil(-extra / (ray_page - local_page)) - 1 if ray_page > local_page else None
            notes.append("ray's per-page time is not below local's, so on one machine ray never pays off as runs "
                         f"grow: it is faster only on small runs (its fixed time is {-extra:.0f} s less)"
                         + (f", up to {until} pages" if until is not None else ""))
        else:
            notes.append(f"ray never pays off on one machine: its per-page time ({ray_page:.1f} s) is not below "
                         f"local's ({local_page:.1f} s) and its fixed time is {extra:.0f} s more, so it is slower "
                         "at every page count")
    section["note"] = "; ".join(notes)
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Model folder (default with --quick: a tiny one made here).")
    parser.add_argument("--quick", action="store_true", help="Tiny model, 2 pages, 8 tokens: checks the harness.")
    parser.add_argument("--pages", type=int, nargs="+", default=[4],
                        help="Report pages, half Letter, half A4; two or more counts (e.g. 2 6) also fit local's "
                             "and ray's start-up and per-page seconds (see start_up in the results).")
    parser.add_argument("--tokens", type=int,
                        help="Output tokens per page (default: the pages' text length in estimated tokens).")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--max-batch-patches", type=int,
                        help="Patches per vision forward pass (the job's default otherwise): a page is handed to "
                             "decoding when its pass ends, so passes of one page start decoding soonest.")
    parser.add_argument("--vision-dtype", default=CPU_TOML["vision_dtype"], choices=["float32", "bfloat16", "int8"],
                        help="Every mode's vision dtype (default float32: exact).")
    add_common_arguments(parser)
    args = parser.parse_args()
    if child_if_asked(args, CHILDREN):
        return
    if args.model is None and not args.quick:
        parser.error("--model is required without --quick")
    work = Path(tempfile.mkdtemp(prefix="ocrbatch-bench-engines-"))
    try:
        results = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(results, args.out)


if __name__ == "__main__":
    main()
