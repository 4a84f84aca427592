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

    python benchmarks/bench_engines.py --model /tmp/full --pages 4 --out benchmarks/results/engines-cpu-2core.json
    python benchmarks/bench_engines.py --quick     # tiny checkpoint, 2 pages, 8 tokens: keeps the harness working
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
    run_child,
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
                      min_file_age=0, layout="none", pdf_text="never", **extra)


def page_figures(rows: list[dict]) -> dict:
    return {"pages": len(rows), "pages_ok": sum(r["status"] == "ok" for r in rows),
            "errors": [r["error"] for r in rows if r["error"]],
            "output_tokens_per_page": [r["n_output_tokens"] for r in rows],
            "image_tokens_per_page": sorted({r["n_image_tokens"] for r in rows if r["n_image_tokens"] is not None})}


def child_ray(spec: dict) -> dict:
    """``run_ray_job`` on a fresh local instance, or on a two-node cluster of this machine."""
    import pyarrow.dataset as ds

    from ocrbatch.engines.ray import RaySettings, run_ray_job

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
            "peak_rss_driver_mb": peak_rss_mb()}


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
        args.pages, args.tokens = min(args.pages, 2), min(args.tokens or 8, 8)
    model = args.model
    if model is None:
        from ocrbatch.dev.model import make_model

        model = str(make_model(work / "tiny", size="tiny"))
    pdfs, _ = make_report_pages(work / "pages", args.pages, CPU_TOML["dpi"], CPU_TOML["max_pixels"])
    chars = []
    for path in pdfs:
        with pymupdf.open(path) as doc:
            chars += [len(page.get_text()) for page in doc]
    tokens = args.tokens or round(sum(chars) / len(chars) / CHARS_PER_TOKEN)
    convert(model, CPU_TOML["quant"])  # cached: no mode pays for the conversion
    spec = {"model": model, "docs": str(work / "pages" / "docs"), "tokens": tokens, "threads": args.threads,
            **CPU_TOML}
    results: dict = {"machine": machine_info(), "settings": {
        "model": model, "quick": args.quick, "pages": len(chars), "papers": [p.stem for p in pdfs],
        "output_tokens_per_page": tokens, "threads": args.threads, **CPU_TOML, "layout": "none",
        "pdf_text": "never"}}
    runs = {}
    for mode in args.modes:
        if mode == "local":
            runs[mode] = run_child("ocrbatch", {**spec, "pages_dir": spec["docs"], "layout": "none"})
        elif mode.startswith("ray"):
            runs[mode] = run_child("ray", {**spec, "nodes": 2 if mode == "ray-2-nodes" else 1}, script=__file__)
        elif mode == "openai":
            with Server(spec, work / "serve.log") as server:
                cpu_before = tree_cpu_s(server.process.pid)
                runs[mode] = run_child("remote", {**spec, "base_url": server.base_url,
                                                  "concurrency": spec["workers"] * spec["seqs"]}, script=__file__)
                runs[mode]["server_cpu_s_per_page"] = (tree_cpu_s(server.process.pid) - cpu_before) / len(chars)
                runs[mode]["cpu_s_per_page"] = runs[mode]["server_cpu_s_per_page"] + runs[mode].get(
                    "client_cpu_s_per_page", 0)
                runs[mode]["server_load_s"] = server.load_s
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
    results["notes"] = args.note
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Checkpoint folder (default with --quick: a tiny one made here).")
    parser.add_argument("--quick", action="store_true", help="Tiny checkpoint, 2 pages, 8 tokens: checks the harness.")
    parser.add_argument("--pages", type=int, default=4, help="Report pages, half Letter, half A4.")
    parser.add_argument("--tokens", type=int,
                        help="Output tokens per page (default: the pages' text length in estimated tokens).")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
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
