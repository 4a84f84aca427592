"""Pages/min with ``--pdf-text auto`` vs ``never`` on a mixed folder of PDFs, side by side in one run.

The folder holds report-like pages, Letter and A4: half born-digital (a
heading, paragraphs and a small table, laid out by PyMuPDF's Story as a word
processor would) and half scanned (the same kind of page rendered in grey at
150 dpi and inserted as a full-page JPEG, no text layer): one born-digital
document, one scanned document, and one that mixes both. The real batch job
(``run_job``) runs over it twice, each time in its own process, with
``configs/cpu.toml``'s pool and rendering (Q4_K_M, 2 workers x 2 sequences,
vision batch 4, 110 dpi, 1254400 max pixels): ``pdf_text="never"`` sends every
page to the model, ``pdf_text="auto"`` takes the born-digital pages from their
text layer. Every model page decodes the same forced number of tokens
(end-of-sentence suppressed). A third process times the text-layer path
alone (judging the page, then Markdown with pymupdf4llm). The ratio of the
two modes' pages/min is the figure to quote: single figures move with the
load on a shared machine, the ratio less. ``--rounds 2`` runs the modes
never-auto-auto-never so that a load that drifts during the run weighs on
both alike, and each run also reports the CPU seconds its processes used
(the job, the render process, the llama.cpp workers): a second ratio that
other jobs' load hardly moves.

    ocrbatch dev make-model /tmp/full --size full --layout official
    python benchmarks/bench_pdf_text.py --model /tmp/full --pages 4 --rounds 2 --out benchmarks/results/mine.json
    python benchmarks/bench_pdf_text.py --quick     # tiny model, 2+2 pages: keeps the harness working
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import (  # helpers in the same folder
    add_common_arguments,
    child_if_asked,
    machine_info,
    peak_rss_mb,
    ratio,
    run_child,
    timed_job,
    write_results,
)
from report_pages import SCAN_DPI, make_documents

# llama.cpp's AMX repacking of quantized weights segfaults on the first decode on some
# AMX CPUs (ggml-org/llama.cpp#20824); scripts/install.sh builds llama.cpp without AMX, but
# another build may have it. When the probe below sees that crash, every process of this
# benchmark (the llama.cpp workers import this file too: they are spawned) loads models
# with use_extra_bufts = false, which is llama.cpp's --no-repack, and the results say so.
NO_REPACK_ENV = "OCRBATCH_BENCH_NO_REPACK"


def _disable_llama_repack() -> None:
    import llama_cpp

    default = llama_cpp.llama_model_default_params
    if getattr(default, "no_repack", False):
        return

    def params():
        value = default()
        value.use_extra_bufts = False
        return value

    params.no_repack = True
    llama_cpp.llama_model_default_params = params


if os.environ.get(NO_REPACK_ENV) == "1":
    _disable_llama_repack()

# configs/cpu.toml's settings for the job (its pdf-text is what this benchmark varies).
CPU_TOML = {"quant": "Q4_K_M", "workers": 2, "seqs": 2, "batch_size": 4, "dpi": 110, "max_pixels": 1254400}
# -- the children ------------------------------------------------------------------------

def child_job(spec: dict) -> dict:
    """The real batch job over the folder with ``spec['pdf_text']`` (see bench.py's ``timed_job``)."""
    # Whole pages, one request each: layout analysis would split a page into blocks.
    run = timed_job(spec, paths=[Path(spec["docs"])], layout="none", pdf_text=spec["pdf_text"], dpi=spec["dpi"],
                    max_pixels=spec["max_pixels"])
    summary, rows, load_s, process_s = run["summary"], run["rows"], run["load_s"], run["process_s"]
    cpu_s, workers_mb = run["cpu_s"], run["workers_mb"]
    model_rows = [r for r in rows if r["source"] == "model"]
    text_rows = [r for r in rows if r["source"] == "text-layer"]
    return {
        "load_s": load_s,
        "process_s": process_s,
        "pages": len(rows),
        "pages_ok": sum(r["status"] == "ok" for r in rows),
        "pages_failed": summary.pages_failed,
        "errors": [r["error"] for r in rows if r["error"]],
        "pages_from_model": len(model_rows),
        "pages_from_text_layer": len(text_rows),
        "summary_pages_text_layer": summary.pages_text_layer,
        "pages_per_min": len(rows) / process_s * 60,
        # CPU seconds of every process of the job (this one, render, workers) while it ran: what the
        # pages cost, much less moved by other jobs on the machine than the wall clock.
        "cpu_s": cpu_s,
        "cpu_s_per_page": cpu_s / len(rows),
        "model_pages_per_min": len(model_rows) / process_s * 60 if model_rows else None,
        "vision_s_per_model_page": sum(r["vision_s"] for r in model_rows) / len(model_rows) if model_rows else None,
        "image_tokens_per_model_page": (sum(r["n_image_tokens"] for r in model_rows) / len(model_rows)
                                        if model_rows else None),
        "output_tokens": sum(r["n_output_tokens"] for r in rows),
        "output_tokens_per_model_page": sorted({r["n_output_tokens"] for r in model_rows}),
        "finish_reasons": {reason: sum(r["finish_reason"] == reason for r in rows)
                           for reason in sorted({str(r["finish_reason"]) for r in rows})},
        "text_layer_chars_per_page": (sum(len(r["text"]) for r in text_rows) / len(text_rows) if text_rows else None),
        "routes": sorted([Path(r["path"]).name, r["page"], r["source"]] for r in rows),
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_workers_mb": workers_mb,
    }


def child_text_layer(spec: dict) -> dict:
    """The text-layer path alone, as the auto run's render process runs it: judge each page, then Markdown.

    The first page also pays for importing pymupdf4llm and loading its layout
    model (once per render process, so once per run); it is reported apart.
    """
    import pymupdf

    from ocrbatch.sources.textlayer import MIN_MARKDOWN_RECALL, assess_page, page_markdown

    judge_s, markdown_s, plain_s, chars, first_s = [], [], [], [], None
    for name, kinds in spec["documents"]:
        path = Path(spec["docs"]) / name
        numbers = [i + 1 for i, kind in enumerate(kinds) if kind == "text"]
        if not numbers:
            continue
        with pymupdf.open(path, filetype="pdf") as judged:
            begin = time.perf_counter()
            verdicts = {number: assess_page(judged[number - 1]) for number in numbers}
            judge_s.append((time.perf_counter() - begin) / len(numbers))
        assert all(verdict.good for verdict in verdicts.values()), verdicts
        with pymupdf.open(path, filetype="pdf") as pdf:  # page_markdown alters the document it reads
            for number in numbers:
                begin = time.perf_counter()
                written = page_markdown(pdf, number)
                elapsed = time.perf_counter() - begin
                assert written.recall >= MIN_MARKDOWN_RECALL, (name, number, written.recall)
                if first_s is None:
                    first_s = elapsed
                    continue
                markdown_s.append(elapsed)
                chars.append(len(written.text))
                begin = time.perf_counter()
                pdf[number - 1].get_text()
                plain_s.append(time.perf_counter() - begin)
    mean = (lambda values: sum(values) / len(values) if values else None)
    return {"pages_timed": len(markdown_s), "judge_s_per_page": mean(judge_s),
            "markdown_s_per_page": mean(markdown_s),
            "s_per_page": (mean(judge_s) or 0) + (mean(markdown_s) or 0) if markdown_s else None,
            "first_page_markdown_s_with_imports": first_s, "markdown_chars_per_page": mean(chars),
            "plain_text_s_per_page_for_comparison": mean(plain_s),
            "peak_rss_mb": peak_rss_mb()}


def child_probe(spec: dict) -> dict:
    """Load the GGUF with llama.cpp's defaults and decode a few tokens (segfaults where AMX repacking does)."""
    from ocrbatch.machine.llama_runtime import llama_cpp_module

    llm = llama_cpp_module().Llama(spec["gguf"], n_ctx=256, n_threads=1, verbose=False)
    llm("The harbour", max_tokens=4)
    return {"ok": True}


def llama_repack_works(gguf: str) -> tuple[bool, str]:
    """Whether llama.cpp can decode ``gguf`` with its default (repacked) weight buffers here."""
    env = {k: v for k, v in os.environ.items() if k != NO_REPACK_ENV}
    process = subprocess.run([sys.executable, __file__, "--child", "probe", json.dumps({"gguf": gguf})],
                             capture_output=True, text=True, timeout=600, env=env, check=False)
    if process.returncode == 0:
        return True, "llama.cpp defaults (weights repacked for this CPU)"
    return False, (f"llama.cpp's default weight repacking crashed here (exit code {process.returncode}; "
                   "AMX: ggml-org/llama.cpp#20824), so every process ran with use_extra_bufts = false "
                   "(llama.cpp's --no-repack)")


CHILDREN = {"job": child_job, "text-layer": child_text_layer, "probe": child_probe}


# -- the run ---------------------------------------------------------------------------

def cpu_flags() -> list[str]:
    """The CPU features that decide which kernels run (AVX-512 variants, VNNI, AMX)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return sorted(f for f in line.split(":", 1)[1].split()
                          if f.startswith(("avx512", "amx", "avx_vnni")) or f in ("avx2", "fma"))
    return []


def measure(args, work: Path) -> dict:
    from ocrbatch.model.gguf import convert

    if args.quick:
        args.pages, args.tokens = min(args.pages, 4), min(args.tokens, 8)
    if args.pages < 2:
        raise SystemExit("bench_pdf_text: --pages must be at least 2 (half born-digital, half scanned)")
    model = args.model
    if model is None:
        from ocrbatch.dev.model import make_model

        model = str(make_model(work / "tiny", size="tiny"))
    docs = work / "docs"
    documents = make_documents(docs, args.pages)
    kinds = [kind for document in documents for kind in document["pages"]]
    gguf = str(convert(model, CPU_TOML["quant"]))  # cached: neither run pays for the conversion
    repack_ok, llama_weights = llama_repack_works(gguf)
    if not repack_ok:
        os.environ[NO_REPACK_ENV] = "1"  # inherited by the children and their workers
        print(f"bench_pdf_text: {llama_weights}", file=sys.stderr, flush=True)
    settings = {"model": model, "quick": args.quick, "pages": len(kinds), "born_digital_pages": kinds.count("text"),
                "scanned_pages": kinds.count("scan"), "documents": documents, "scan_dpi": SCAN_DPI,
                "forced_output_tokens": args.tokens, "vision_dtype": args.vision_dtype, "threads": args.threads,
                **CPU_TOML, "min_file_age": 0, "llama_weights": llama_weights}
    results: dict = {"machine": {**machine_info(), "cpu_flags": cpu_flags()}, "settings": settings}
    spec = {"model": model, "docs": str(docs), "tokens": args.tokens, "vision_dtype": args.vision_dtype,
            "threads": args.threads, **CPU_TOML}
    # Round 1 runs never then auto; round 2 auto then never, and so on (ABBA): a load that drifts
    # during the run then weighs on both modes alike.
    rounds = []
    for index in range(args.rounds):
        order = ("never", "auto") if index % 2 == 0 else ("auto", "never")
        rounds.append({"order": list(order), **{mode: run_child("job", {**spec, "pdf_text": mode}, script=__file__) for mode in order}})
    runs = {mode: rounds[0][mode] for mode in ("never", "auto")}
    results["runs"] = runs
    if args.rounds > 1:
        results["rounds"] = [{"order": r["order"], **{mode: {key: r[mode].get(key) for key in (
            "process_s", "pages_per_min", "cpu_s", "load_average_1min_before_after", "error")} for mode in r["order"]}}
            for r in rounds]
    results["text_layer"] = run_child("text-layer", {"docs": str(docs), "documents": [
        [d["name"], d["pages"]] for d in documents]}, script=__file__)

    expected = sorted([d["name"], number + 1, "text-layer" if kind == "text" else "model"]
                      for d in documents for number, kind in enumerate(d["pages"]))
    every = [r[mode] for r in rounds for mode in r["order"]]
    results["checks"] = {
        "every_page_ok": all(r.get("pages_ok") == len(kinds) and not r.get("pages_failed") for r in every),
        "never_all_from_model": all(r["never"].get("pages_from_model") == len(kinds) for r in rounds),
        "auto_born_digital_from_text_layer": all(r["auto"].get("routes") == expected for r in rounds),
        "forced_length_every_model_page": all(r.get("output_tokens_per_model_page") == [args.tokens] for r in every),
    }

    def mean_of(mode: str, key: str):
        values = [r[mode].get(key) for r in rounds]
        return sum(values) / len(values) if values and None not in values else None

    never_s, auto_s = mean_of("never", "process_s"), mean_of("auto", "process_s")
    never_cpu, auto_cpu = mean_of("never", "cpu_s"), mean_of("auto", "cpu_s")
    results["pages_per_min"] = {
        "never": len(kinds) / never_s * 60 if never_s else None,
        "auto": len(kinds) / auto_s * 60 if auto_s else None,
        # The same pages/min had the job had every core to itself: pages per CPU-minute times cores.
        "never_from_cpu_time": len(kinds) / never_cpu * 60 * args.threads if never_cpu else None,
        "auto_from_cpu_time": len(kinds) / auto_cpu * 60 * args.threads if auto_cpu else None,
    }
    results["ratios"] = {
        # wall clock, mean over the rounds
        "pages_per_min_auto_vs_never": ratio(never_s, auto_s),
        # CPU time of the job's processes: robust to other jobs' load, blind to idle cores
        "pages_per_cpu_s_auto_vs_never": ratio(never_cpu, auto_cpu),
        # the bound if text-layer pages cost nothing: all pages over the model pages
        "ideal_if_text_layer_free": ratio(len(kinds), kinds.count("scan")),
    }
    results["notes"] = args.note
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Model folder (default with --quick: a tiny one made here).")
    parser.add_argument("--quick", action="store_true",
                        help="Tiny model, 2+2 pages, 8 tokens: checks the harness.")
    parser.add_argument("--pages", type=int, default=8, help="Pages in the folder, half born-digital.")
    parser.add_argument("--tokens", type=int, default=128, help="Forced output length per model page.")
    parser.add_argument("--vision-dtype", default="int8", choices=["float32", "bfloat16", "int8"])
    parser.add_argument("--rounds", type=int, default=1,
                        help="Run both modes this many times, alternating the order (never-auto, auto-never, ...).")
    parser.add_argument("--keep-docs", type=Path, help="Also copy the generated PDFs to this folder.")
    add_common_arguments(parser)
    args = parser.parse_args()
    if child_if_asked(args, CHILDREN):
        return
    if args.model is None and not args.quick:
        parser.error("--model is required without --quick")

    work = Path(tempfile.mkdtemp(prefix="ocrbatch-bench-pdf-text-"))
    try:
        results = measure(args, work)
        if args.keep_docs:
            shutil.copytree(work / "docs", args.keep_docs, dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(results, args.out)


if __name__ == "__main__":
    main()
