"""Side-by-side benchmark: transformers vs ocrbatch (vs llama.cpp's own mmproj path), one run.

Every engine runs on the same synthetic pages with the same forced output
length (end-of-sentence suppressed), each in its own subprocess so its peak
RSS is its own. Ratios are computed from figures measured in this one run,
because these machines are noisy. Prints the results as JSON and writes them
to ``--out``.

    python benchmarks/bench.py --model /path/to/full-checkpoint --out benchmarks/results/cpu-2core.json
    python benchmarks/bench.py --quick     # tiny model, seconds: keeps the harness working in CI
    python benchmarks/bench.py --model /tmp/full --layout cdla --stitch on off   # layout mode vs the same blocks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

PROMPT = "OCR:"
# Pool settings for the engine comparison: configs/cpu.toml's, the fastest in the scaling run.
ENGINE_SETTINGS = {"workers": 2, "seqs": 2, "batch_size": 4}


def tuning(spec: dict) -> dict:
    """The optional job settings a benchmark's spec sets (``--max-batch-patches``), the job's defaults otherwise."""
    return {key: spec[key] for key in ("max_batch_patches",) if spec.get(key) is not None}


# -- helpers -----------------------------------------------------------------------------

def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak resident memory (VmHWM).

    Not ``getrusage``: its ``ru_maxrss`` survives fork+exec, so a child started
    from a big parent reports the parent's peak. VmHWM starts afresh at exec.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(worker_pids: list[int]) -> float:
    """CPU seconds used so far by this process, its reaped children (the render process) and the live workers."""
    import resource

    used = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        used += usage.ru_utime + usage.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for pid in worker_pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a worker that died and was replaced: its time is lost, which only flatters the run
        used += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return used


def machine_info() -> dict:
    import llama_cpp
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(memory_kb / 2**20, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "llama_cpp_python": llama_cpp.__version__,
            "date": time.strftime("%Y-%m-%d")}


def make_pages(folder: Path, count: int, size: int) -> list[Path]:
    from ocrbatch.dev.samples import synthetic_page

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"page-{index:03d}.png"
        synthetic_page(size, size, seed=index).save(path)
        paths.append(path)
    return paths


def run_child(kind: str, spec: dict, timeout: float = 3600, script: str = __file__) -> dict:
    """Run one measurement in a fresh process (``script --child kind spec``); its last stdout line is its JSON."""
    name = Path(script).stem
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    process = subprocess.run([sys.executable, script, "--child", kind, json.dumps(spec)],
                             capture_output=True, text=True, timeout=timeout, check=False)
    wall_s = time.perf_counter() - started
    if process.returncode != 0:
        error = process.stderr.strip().splitlines()[-1] if process.stderr.strip() else "failed"
        print(f"{name}: {kind} failed: {error}", file=sys.stderr, flush=True)
        return {"error": error, "wall_s": wall_s}
    result = json.loads(process.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall_s
    # Other jobs' load moves single figures (CPU seconds less): recorded beside each run.
    result["load_average_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(f"{name}: {kind} {spec.get('quant', '')} {spec.get('vision_dtype', spec.get('dtype', ''))} "
          f"{spec.get('layout', '')} done in {wall_s:.0f} s", file=sys.stderr, flush=True)
    return result


# -- children ----------------------------------------------------------------------------

class StepClock:
    """A logits processor that only notes when each generation step's logits are ready."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def load_transformers(spec: dict):
    """transformers' PaddleOCR-VL in ``spec["dtype"]`` on ``spec["threads"]``: (processor, model, load seconds)."""
    import torch
    from transformers import AutoProcessor, PaddleOCRVLForConditionalGeneration

    torch.set_num_threads(spec["threads"])
    started = time.perf_counter()
    processor = AutoProcessor.from_pretrained(spec["model"])
    model = PaddleOCRVLForConditionalGeneration.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"]))
    return processor, model.eval(), time.perf_counter() - started


def chat_inputs(processor, items, pixel_bounds: tuple[int, int] | None = None):
    """Model inputs for (image, prompt) pairs, one conversation each; several make one padded batch.

    Padded on the left, so every sequence's generated tokens follow its own
    prompt (what a batched ``generate`` needs). ``pixel_bounds`` (min, max
    pixels) replaces the processor's resize bounds, as ocrbatch's encoder
    does for layout blocks.
    """
    conversations = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
                     for image, prompt in items]
    size = {"size": {"shortest_edge": pixel_bounds[0], "longest_edge": pixel_bounds[1]}} if pixel_bounds else {}
    return processor.apply_chat_template(conversations if len(items) > 1 else conversations[0], tokenize=True,
                                         add_generation_prompt=True, return_dict=True, return_tensors="pt",
                                         processor_kwargs={"padding": True, "padding_side": "left", **size})


def forced_generate(model, inputs, n: int) -> tuple[float, float, float, int]:
    """Greedy ``generate`` of exactly ``n`` tokens a sequence (end-of-sentence suppressed by min_new_tokens).

    Returns seconds for the whole call, for the decode steps alone, and for
    the first step (vision + prefill), and the tokens generated in all.
    """
    import torch

    clock = StepClock()
    with torch.inference_mode():
        begin = time.perf_counter()
        output = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                logits_processor=[clock])
        total_s = time.perf_counter() - begin
    generated = (output.shape[1] - inputs["input_ids"].shape[1]) * output.shape[0]
    return total_s, clock.stamps[-1] - clock.stamps[0], clock.stamps[0] - begin, generated


def child_transformers(spec: dict) -> dict:
    """Plain transformers on whole pages: one page at a time, generate with min_new_tokens = max_new_tokens."""
    import torch
    from PIL import Image

    processor, model, load_s = load_transformers(spec)
    dtype = model.dtype
    tokens = spec["tokens"]

    def inputs_for(*paths):
        """One conversation per page; several pages make one padded batch."""
        return chat_inputs(processor, [(Image.open(path).convert("RGB"), PROMPT) for path in paths])

    def generate(inputs, n):
        return forced_generate(model, inputs, n)[:3]

    first = inputs_for(spec["pages"][0])
    with torch.inference_mode():
        begin = time.perf_counter()
        model.model.get_image_features(first["pixel_values"].to(dtype), first["image_grid_thw"])
        vision_s = time.perf_counter() - begin
    cpu_before = cpu_seconds([])
    runs = [generate(inputs_for(path), tokens) for path in spec["pages"]]
    cpu_s = cpu_seconds([]) - cpu_before
    page_times = [total for total, _, _ in runs]
    warm = runs[1:] or runs  # the first call also warms up
    decode_s = sum(decode for _, decode, _ in warm)
    first_step_s = min(first for _, _, first in runs)  # vision + prefill
    n_prompt = int(first["input_ids"].shape[1])
    result = {
        "load_s": load_s,
        "vision_s_per_page": vision_s,
        "image_patches_first_page": int(first["image_grid_thw"].prod()),
        # the first step is vision + prefill; too small to split on tiny models
        "prefill_tok_s": n_prompt / (first_step_s - vision_s) if first_step_s > 1.5 * vision_s else None,
        "decode_tok_s": (tokens - 1) * len(warm) / decode_s,
        "process_s": sum(page_times),
        "pages_per_min": len(page_times) / sum(page_times) * 60,
        "cpu_s_per_page": cpu_s / len(page_times),
        "peak_rss_mb": peak_rss_mb(),
    }
    if spec.get("batched", True):  # four pages in one generate call: what batching buys transformers' decoder
        batch = (spec["pages"] * 4)[:4]
        _, batch_decode_s, _ = generate(inputs_for(*batch), tokens)
        result[f"decode_tok_s_{len(batch)}_sequences"] = len(batch) * (tokens - 1) / batch_decode_s
    return result


def layout_pages(pdfs: list[str], dpi: float, detector, model_max_pixels: int):
    """Each page of ``pdfs`` as ocrbatch's layout stage sees it: (page image, blocks, seconds to render and detect).

    The job's own code path: rendered by :func:`ocrbatch.sources.rasterize.iter_pages`
    under the layout cap at ``dpi``, blocks from ``detector`` (a
    :func:`ocrbatch.layout.detect.load_layout` detector). Callers make the model's
    units with :func:`ocrbatch.job.units.layout_units`, as the job does.
    """
    from ocrbatch.sources.discover import Document
    from ocrbatch.sources.rasterize import count_pages, iter_pages, page_pixel_cap

    for path in pdfs:
        document = Document(Path(path), None)
        started = time.perf_counter()
        for page in iter_pages(document, range(1, count_pages(document) + 1), dpi,
                               page_pixel_cap(detector.name, model_max_pixels)):
            if page.error:
                raise RuntimeError(page.error)
            blocks = detector.detect(page.image)
            yield page.image, blocks, time.perf_counter() - started
            started = time.perf_counter()


def child_transformers_blocks(spec: dict) -> dict:
    """The fair anchor: transformers on exactly the units of ocrbatch's layout stage, one ``generate`` per page.

    What a user of the official layout pipeline with a transformers backend
    runs: the same render, layout blocks, crops, stitching (``spec["stitch"]``)
    and pixel bounds as ocrbatch (:func:`layout_pages`, then
    :func:`ocrbatch.job.units.layout_units`), each page's units one
    left-padded batch, every unit decoding ``spec["tokens"]``. The clock runs
    over rendering and layout too, as ocrbatch's job does.
    """
    from PIL import Image

    from ocrbatch.job.units import layout_units
    from ocrbatch.layout.detect import load_layout

    processor, model, load_s = load_transformers(spec)
    detector = load_layout(spec["layout"], threads=spec["threads"])
    # transformers runs eagerly, but its first call still pays for allocations: not on the clock.
    forced_generate(model, chat_inputs(processor, [(Image.new("RGB", (224, 224), "white"), PROMPT)]), 2)
    pages = []
    cpu_before = cpu_seconds([])
    begin = time.perf_counter()
    for image, blocks, layout_s in layout_pages(spec["documents"], spec["dpi"], detector,
                                                processor.image_processor.size.longest_edge):
        units, _ = layout_units(image, blocks, spec["stitch"])
        [bounds] = {unit.pixel_bounds for unit in units}  # one processor call resizes within one set of bounds
        inputs = chat_inputs(processor, [(unit.image, unit.prompt) for unit in units], bounds)
        _, _, first_step_s, generated = forced_generate(model, inputs, spec["tokens"])
        pages.append({"layout_s": layout_s, "first_step_s": first_step_s, "generated": generated,
                      "calls": len(units), "blocks": sum(len(unit.blocks) for unit in units),
                      "patches": int(inputs["image_grid_thw"].prod(-1).sum())})
    process_s = time.perf_counter() - begin
    cpu_s = cpu_seconds([]) - cpu_before
    count = len(pages)

    def per_page(key):
        return sum(page[key] for page in pages) / count

    return {
        "load_s": load_s,
        "layout_s_per_page": per_page("layout_s"),  # render and layout detection
        "vision_prefill_s_per_page": per_page("first_step_s"),
        "image_patches_per_page": per_page("patches"),
        "blocks_per_page": per_page("blocks"),
        "model_calls_per_page": per_page("calls"),
        "output_tokens": sum(page["generated"] for page in pages),
        "pages_per_min": count / process_s * 60,
        "process_s": process_s,
        "cpu_s_per_page": cpu_s / count,
        "peak_rss_mb": peak_rss_mb(),
    }


def row_finish_times(rows: list[dict], process_start: float, job_start: float) -> dict:
    """When the rows finished (``created_at``, stamped as a page's decoding settles), from process and job start."""
    finished = sorted(row["created_at"].timestamp() for row in rows if row.get("created_at") is not None)
    if not finished:
        return {}
    return {"first_row_s_from_process_start": finished[0] - process_start,
            "last_row_s_from_process_start": finished[-1] - process_start,
            "first_row_s_from_job_start": finished[0] - job_start,
            "last_row_s_from_job_start": finished[-1] - job_start,
            "rows_finished_s_from_process_start": [round(moment - process_start, 2) for moment in finished]}


def timed_job(spec: dict, **job) -> dict:
    """The real batch job (run_job) with the engine and pool loaded and warm before the clock starts.

    ``job`` is the JobOptions fields besides the pool, model and forced output
    length taken from ``spec``. Returns the summary, the rows, load/process
    seconds, the CPU seconds of the job's processes and the workers' peak RSS.
    """
    import pyarrow.parquet as pq
    from PIL import Image

    from ocrbatch.backends.pool import WorkerPool
    from ocrbatch.engine import Engine
    from ocrbatch.engines.local import run_job
    from ocrbatch.job.options import JobOptions

    started = time.perf_counter()
    engine = Engine(spec["model"], quant=spec["quant"], vision_dtype=spec["vision_dtype"],
                    max_tokens=spec["tokens"], threads=spec["threads"], with_language=False)
    pool = WorkerPool(engine.gguf_path, workers=spec["workers"], n_seq_max=spec["seqs"],
                      n_ctx=engine.context_size(spec["seqs"]),
                      threads=max(1, spec["threads"] // spec["workers"]))
    # int8 vision compiles on its first batch (dynamic shapes: once); do it before the clock.
    engine.vision.encode([Image.new("RGB", (224, 224), "white")])
    while pool.pending or not all(w.ready for w in pool._workers):
        time.sleep(0.05)  # let the workers finish loading before the clock starts
    load_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "out.parquet"
        options = JobOptions(out=out, model=spec["model"], quant=spec["quant"], max_tokens=spec["tokens"],
                             ignore_eos=True, workers=spec["workers"], seqs_per_worker=spec["seqs"],
                             batch_size=spec["batch_size"], vision_dtype=spec["vision_dtype"],
                             threads=spec["threads"], progress=False, min_file_age=0, **tuning(spec), **job)
        cpu_before = cpu_seconds(pool.worker_pids)
        job_start = time.time()  # epoch seconds, as the rows' created_at
        begin = time.perf_counter()
        summary = run_job(options, engine=engine, pool=pool)
        process_s = time.perf_counter() - begin
        cpu_s = cpu_seconds(pool.worker_pids) - cpu_before  # the render process is reaped by now
        rows = pq.read_table(out).to_pylist()
    workers_mb = [peak_rss_mb(pid) for pid in pool.worker_pids]
    pool.close()
    return {"summary": summary, "rows": rows, "load_s": load_s, "process_s": process_s, "cpu_s": cpu_s,
            "workers_mb": workers_mb, "job_start": job_start}


def child_ocrbatch(spec: dict) -> dict:
    """The real batch job over the page folder (see :func:`timed_job`).

    ``spec`` may set ``layout`` (default none: whole pages), ``stitch``,
    ``dpi`` and ``max_pixels`` (the job's defaults otherwise); PDFs go to the
    model even where they have a text layer.
    """
    import psutil

    rendering = {key: spec[key] for key in ("dpi", "max_pixels", "stitch") if key in spec}
    run = timed_job(spec, paths=[Path(spec["pages_dir"])], layout=spec.get("layout", "none"), pdf_text="never",
                    **rendering)
    summary, rows, load_s, process_s = run["summary"], run["rows"], run["load_s"], run["process_s"]
    cpu_s, workers_mb = run["cpu_s"], run["workers_mb"]
    assert summary.pages_failed == 0, [r["error"] for r in rows if r["error"]]
    count = len(rows)
    recognised = [block for row in rows for block in row["blocks"] if block["prompt"]]
    return {
        "load_s": load_s,
        "vision_s_per_page": sum(r["vision_s"] for r in rows) / count,
        # patches before the 2x2 merge into image tokens
        "image_patches_per_page": sum(r["n_image_tokens"] for r in rows) * 4 / count,
        "layout_s_per_page": sum(r["layout_s"] or 0 for r in rows) / count,
        "blocks_per_page": len(recognised) / count,
        # one model call per unit: a whole page, a block alone, or the blocks stitched into one image (a group)
        "model_calls_per_page": sum(len({b["group"] for b in r["blocks"] if b["prompt"]}) if r["blocks"] else 1
                                    for r in rows) / count,
        "blocks_by_prompt": {prompt: sum(b["prompt"] == prompt for b in recognised)
                             for prompt in sorted({b["prompt"] for b in recognised})},
        "pages_per_min": count / process_s * 60,
        "process_s": process_s,
        "cpu_s_per_page": cpu_s / count,
        "output_tokens": sum(r["n_output_tokens"] for r in rows),
        "output_tokens_per_page": [r["n_output_tokens"] for r in rows],
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_workers_mb": workers_mb,
        "peak_rss_total_mb": peak_rss_mb() + sum(workers_mb),
        **row_finish_times(rows, psutil.Process().create_time(), run["job_start"]),
    }


def _lm_requests(spec: dict, count: int):
    """Prompts with random image embeddings of a real page's size: speed does not depend on values."""
    import numpy as np

    from ocrbatch.model.language import GenerationRequest
    from ocrbatch.model.prompt import PromptBuilder
    from ocrbatch.model.weights import ModelWeights

    checkpoint = ModelWeights.open(spec["model"])
    merge = checkpoint.vision_config.spatial_merge_size
    prompts = PromptBuilder(checkpoint.path, checkpoint.config.image_token_id, merge)
    grid = (1, spec["image_size"] // 14, spec["image_size"] // 14)
    prompt = prompts.build(PROMPT, grid)
    rng = np.random.default_rng(0)
    width = checkpoint.text_config.hidden_size
    return [GenerationRequest(prompt, rng.normal(0, 0.02, (prompt.n_image_tokens, width)).astype(np.float32),
                              spec["tokens"]) for _ in range(count)]


def time_generation(model, requests, on_prefilled=lambda: None) -> tuple[float, float, int]:
    """Run ``requests`` together: (prefill seconds, decode seconds, tokens decoded after the prefill).

    The prefill figure includes the first decode step (~3% of it).
    """
    scheduler = model.scheduler()
    for index, request in enumerate(requests):
        scheduler.submit(index, request)
    begin = time.perf_counter()
    finished = scheduler.step()
    prefill_s = time.perf_counter() - begin
    tokens_before = sum(len(seq.tokens) for seq in scheduler.active)
    on_prefilled()
    begin = time.perf_counter()
    while scheduler.busy:
        finished += scheduler.step()
    decode_s = time.perf_counter() - begin
    return prefill_s, decode_s, sum(len(r.token_ids) for _, r in finished) - tokens_before


def child_llama(spec: dict) -> dict:
    """The language model alone: prefill, then decode-only rates with 1, 4 and 8 sequences together."""
    from ocrbatch.model.language import LanguageModel

    [single] = _lm_requests(spec, 1)
    result = {}
    for n_seq in (1, 4, 8):
        requests = _lm_requests(spec, n_seq)
        with LanguageModel(spec["gguf"], n_ctx=n_seq * (single.prompt.n_prompt_tokens + spec["tokens"]),
                           n_seq_max=n_seq, n_threads=spec["threads"]) as model:
            model.generate(requests[:1])  # warm-up
            prefill_s, decode_s, decoded = time_generation(model, requests)
        if n_seq == 1:
            result["prefill_tok_s"] = single.prompt.n_prompt_tokens / prefill_s
            result["decode_tok_s"] = decoded / decode_s
        else:
            result[f"decode_tok_s_{n_seq}_sequences"] = decoded / decode_s
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def child_fidelity(spec: dict) -> dict:
    """Agreement with the exact pipeline (float32 vision, F32 GGUF) on the same pages.

    Quantized GGUFs are fed the float32 vision embeddings; the int8 vision
    rows feed int8 embeddings to the F32 GGUF and to Q4_K_M, and the
    bfloat16 one (``spec["vision_dtypes"]``, default int8 only) bfloat16
    embeddings to the F32 GGUF.
    """
    from PIL import Image

    from ocrbatch.engine import Engine
    from ocrbatch.model.gguf import convert
    from ocrbatch.model.language import LanguageModel
    from ocrbatch.model.vision import VisionEncoder

    engine = Engine(spec["model"], quant="F32", max_tokens=spec["tokens"], threads=spec["threads"],
                    with_language=False)
    images = [Image.open(p).convert("RGB") for p in spec["pages"]]
    exact_requests = [engine.request(e, PROMPT, spec["tokens"]) for e in engine.vision.encode(images)]
    vision_requests = {dtype: [engine.request(e, PROMPT, spec["tokens"])
                               for e in VisionEncoder(engine.weights, dtype=dtype).encode(images)]
                       for dtype in spec.get("vision_dtypes", ["int8"])}
    n_ctx = max(r.prompt.n_prompt_tokens for r in exact_requests) + spec["tokens"] + 8

    def greedy(quant, requests, reference=None):
        with LanguageModel(convert(spec["model"], quant), n_ctx=n_ctx, n_threads=spec["threads"]) as model:
            outputs = [r.token_ids for r in model.generate(requests)]
            forced = None
            if reference is not None:
                forced = [model.score(request, ref) for request, ref in zip(requests, reference)]
            return outputs, forced

    reference, _ = greedy("F32", exact_requests)
    runs = {quant: (quant, exact_requests) for quant in spec["quants"]}
    for dtype, requests in vision_requests.items():
        runs[f"vision-{dtype}+F32"] = ("F32", requests)
        if dtype == "int8":
            runs["vision-int8+Q4_K_M"] = ("Q4_K_M", requests)
    results = {}
    for label, (quant, requests) in runs.items():
        outputs, choices = greedy(quant, requests, reference)
        agree = sum(c == t for ref, chosen in zip(reference, choices) for c, t in zip(chosen, ref))
        total = sum(len(ref) for ref in reference)
        results[label] = {
            "teacher_forced_top1_agreement": agree / max(total, 1),
            "greedy_exact_match_rate": sum(o == r for o, r in zip(outputs, reference)) / len(reference),
        }
    return {"pages": len(exact_requests), "tokens": spec["tokens"], "vs_exact_pipeline": results}


def child_mmproj(spec: dict) -> dict:
    """llama.cpp's all-GGUF path: mtmd with an mmproj, through llama-cpp-python's chat handler."""
    import base64

    from llama_cpp.llama_chat_format import MTMDChatHandler

    from ocrbatch.machine.llama_runtime import llama_cpp_module

    Llama = llama_cpp_module().Llama  # with ocrbatch's build, llama.cpp's CPU backend loads from here
    started = time.perf_counter()
    handler = MTMDChatHandler(clip_model_path=spec["mmproj"], verbose=False)
    llm = Llama(model_path=spec["gguf"], chat_handler=handler, n_ctx=spec["n_ctx"], n_threads=spec["threads"],
                n_batch=2048, verbose=False)
    load_s = time.perf_counter() - started
    times = []
    for path in spec["pages"]:
        uri = "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
        begin = time.perf_counter()
        llm.create_chat_completion(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": PROMPT}]}],
            max_tokens=spec["tokens"], temperature=0.0, logit_bias={spec["eos"]: -1e9})
        times.append(time.perf_counter() - begin)
    return {"load_s": load_s, "process_s": sum(times), "pages_per_min": len(times) / sum(times) * 60,
            "peak_rss_mb": peak_rss_mb()}


CHILDREN = {"transformers": child_transformers, "transformers-blocks": child_transformers_blocks,
            "ocrbatch": child_ocrbatch, "llama": child_llama,
            "fidelity": child_fidelity, "mmproj": child_mmproj}


# -- the run ---------------------------------------------------------------------------

def build_mmproj(model: str, work: Path) -> tuple[str | None, str]:
    """An mmproj GGUF made by llama.cpp's own converter from the sdist (downloaded, never committed)."""
    sdist = work / "sdist"
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                        "llama-cpp-python==0.3.36", "-d", str(sdist)], check=True, capture_output=True, timeout=600)
        archive = next(sdist.glob("llama_cpp_python-*.tar.gz"))
        subprocess.run(["tar", "xzf", str(archive), "-C", str(sdist)], check=True)
        root = next(sdist.glob("llama_cpp_python-*/vendor/llama.cpp"))
        target = work / "mmproj.gguf"
        env = {**os.environ, "PYTHONPATH": str(root / "gguf-py")}
        process = subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), model, "--mmproj",
                                  "--outtype", "f16", "--outfile", str(target)],
                                 capture_output=True, text=True, env=env, timeout=1800)
        if process.returncode != 0:
            lines = process.stderr.strip().splitlines()
            return None, "llama.cpp's converter failed: " + (lines[-1] if lines else "no output")
        return str(target), "ok"
    except Exception as exc:  # report, do not abort the other measurements
        return None, f"{type(exc).__name__}: {exc}"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark has: threads, notes, the output file, and the hidden child entry."""
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--note", action="append", default=[], help="A note to store in the results (repeatable).")
    parser.add_argument("--out", type=Path, help="Also write the results (JSON) here.")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)


def child_if_asked(args, children: dict) -> bool:
    """Run the child measurement ``--child KIND SPEC`` asks for, printing its JSON; False when not a child."""
    if not args.child:
        return False
    kind, spec = args.child
    print(json.dumps(children[kind](json.loads(spec))))
    return True


def write_results(results: dict, out: Path | None) -> None:
    """Print the results as JSON, and write them to ``out`` when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Model folder (default: a tiny one with --quick).")
    parser.add_argument("--quick", action="store_true", help="Tiny model, few pages: checks the harness.")
    parser.add_argument("--pages", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--tokens", type=int, default=64, help="Forced output length per page.")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-mmproj", action="store_true")
    parser.add_argument("--fidelity-model", action="append", default=[],
                        help="Extra checkpoints for the fidelity section (e.g. the tiny one).")
    parser.add_argument("--engines", nargs="+", metavar="NAME",
                        help="Run only these engines (e.g. transformers-float32 ocrbatch-Q4_K_M-vision-int8).")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--layout", nargs="+", choices=["none", "cdla"], metavar="MODE",
                        help="Instead of the synthetic pages: report pages (Letter and A4 at --dpi, of each "
                             "--page-kinds) through ocrbatch with each --layout MODE and each --vision-dtypes, beside "
                             "transformers float32 on the whole pages (with none) and on the same blocks (with a "
                             "layout), at the same output tokens per page.")
    parser.add_argument("--vision-dtypes", nargs="+", default=["float32", "int8"], metavar="DTYPE",
                        help="With --layout: the vision dtypes to run ocrbatch with.")
    parser.add_argument("--stitch", nargs="+", choices=["on", "off"], default=["on"], metavar="MODE",
                        help="With --layout cdla: run layout mode with stitching on (the default) and/or off "
                             "(--no-stitch); both give the stitched/unstitched ratios of model calls, image "
                             "patches and pages/min.")
    parser.add_argument("--page-kinds", nargs="+", choices=["text", "figure"], default=["text", "figure"],
                        metavar="KIND", help="With --layout: the report pages' kinds, in turn: text (paragraphs "
                        "and a table) and figure (text running around a chart, where stitching applies).")
    parser.add_argument("--dpi", type=int, default=110, help="With --layout: render DPI (configs/cpu.toml's).")
    parser.add_argument("--max-pixels", type=int, default=1254400,
                        help="With --layout: render cap in pixels (configs/cpu.toml's).")
    parser.add_argument("--page-tokens", type=int,
                        help="With --layout: output tokens per page (default: a page's text-layer length in "
                             "estimated tokens, what a faithful transcription would decode).")
    add_common_arguments(parser)
    args = parser.parse_args()
    if child_if_asked(args, CHILDREN):
        return

    work = Path(tempfile.mkdtemp(prefix="ocrbatch-bench-"))
    try:
        results = measure_layout(args, work) if args.layout else measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # pages, the llama.cpp sdist, the mmproj
    write_results(results, args.out)


def measure(args, work: Path) -> dict:
    """Every measurement of one run, with the ratios between them."""
    from ocrbatch.model.gguf import convert

    if args.quick:
        args.pages, args.tokens, args.image_size = min(args.pages, 2), min(args.tokens, 8), min(args.image_size, 224)
        args.skip_mmproj = True
    model = args.model
    if model is None:
        from ocrbatch.dev.model import make_model

        model = str(make_model(work / "tiny", size="tiny"))
    pages = make_pages(work / "pages", args.pages, args.image_size)
    base = {"model": model, "tokens": args.tokens, "threads": args.threads, "image_size": args.image_size}
    quants = ["F16", "Q8_0", "Q4_K_M"]
    results: dict = {"machine": machine_info(), "settings": {
        "model": model, "pages": args.pages, "image_size": args.image_size, "forced_output_tokens": args.tokens,
        "threads": args.threads, "quick": args.quick, "engines": args.engines or "all"}}

    ggufs = {q: str(convert(model, q)) for q in ["F32", *quants]}
    results["gguf_mb"] = {q: round(Path(p).stat().st_size / 2**20, 1) for q, p in ggufs.items()}

    def wanted(name: str) -> bool:
        return not args.engines or name in args.engines

    engines = {}
    for dtype in ("float32", "bfloat16"):
        if wanted(f"transformers-{dtype}"):
            engines[f"transformers-{dtype}"] = run_child("transformers", {**base, "dtype": dtype,
                                                                          "pages": [str(p) for p in pages]})
    ocr_configs = [(q, v) for q in quants for v in ("float32", "bfloat16", "int8")]
    if args.quick:
        ocr_configs = [("F16", "float32"), ("Q4_K_M", "int8")]
    for quant, vision in ocr_configs:
        if wanted(f"ocrbatch-{quant}-vision-{vision}"):
            engines[f"ocrbatch-{quant}-vision-{vision}"] = run_child("ocrbatch", {
                **base, "quant": quant, "vision_dtype": vision, "pages_dir": str(work / "pages"),
                **ENGINE_SETTINGS})
    results["engines"] = engines
    results["language_model"] = {q: run_child("llama", {**base, "gguf": ggufs[q]}) for q in quants}

    if not args.skip_mmproj and wanted("llama.cpp-mmproj-Q4_K_M"):
        mmproj, status = build_mmproj(model, work)
        if mmproj:
            from ocrbatch.model.weights import ModelWeights

            eos = ModelWeights.open(model).eos_token_ids[0]
            engines["llama.cpp-mmproj-Q4_K_M"] = run_child("mmproj", {
                **base, "gguf": ggufs["Q4_K_M"], "mmproj": mmproj, "eos": eos, "n_ctx": 8192,
                "pages": [str(p) for p in pages]})
        else:
            engines["llama.cpp-mmproj-Q4_K_M"] = {"error": status}

    if not args.skip_scaling and not args.quick:
        grid = [(1, 1, 1), (1, 4, 1), (1, 4, 4), (2, 2, 1), (2, 2, 4), (1, 8, 8)]
        results["scaling"] = [
            {"workers": w, "seqs_per_worker": s, "batch_size": b, **run_child("ocrbatch", {
                **base, "quant": "Q4_K_M", "vision_dtype": "int8", "pages_dir": str(work / "pages"),
                "workers": w, "seqs": s, "batch_size": b})}
            for w, s, b in grid]

    if not args.skip_fidelity:
        fidelity_pages = [str(p) for p in pages[: min(4, len(pages))]]
        results["fidelity"] = {m: run_child("fidelity", {**base, "model": m, "quants": quants,
                                                         "pages": fidelity_pages})
                               for m in [model, *args.fidelity_model]}

    add_ratios(results)
    return results


def make_report_pages(folder: Path, pages: int, dpi: int, max_pixels: int, kinds: Sequence[str] = ("text",)
                      ) -> tuple[list[Path], list[Path]]:
    """Born-digital report PDFs (half Letter, half A4) and each page rendered as the job renders a whole page (PNG).

    Page ``i`` of the run (Letter first) is of kind ``kinds[i % len(kinds)]`` (see :mod:`report_pages`).
    """
    import pymupdf
    from report_pages import add_page

    from ocrbatch.sources.rasterize import pdf_zoom

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs").mkdir()
    pdfs, images = [], []
    for paper in ("letter", "a4"):
        count = pages // 2 + (pages % 2 if paper == "letter" else 0)
        if not count:
            continue
        path = folder / "docs" / f"report-{paper}.pdf"
        with pymupdf.open() as doc:
            for index in range(count):
                seed = len(images) + index
                add_page(doc, kinds[seed % len(kinds)], seed, paper)
            doc.save(path, garbage=3, deflate=True)
            for page in doc:
                zoom = pdf_zoom(page.rect.width, page.rect.height, dpi, max_pixels)
                image = folder / f"{path.stem}-{page.number + 1}.png"
                page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom)).save(image)
                images.append(image)
        pdfs.append(path)
    return pdfs, images


# English prose averages about four characters per token in the 100k-token vocabularies of
# current language models (ERNIE-4.5's is 103k); the test checkpoints' small trained vocabulary
# would count twice as many tokens, so page lengths are estimated from characters instead.
CHARS_PER_TOKEN = 4


def report_page_facts(pdfs: list[Path], model: str, dpi: int, threads: int) -> dict:
    """Per page: its text layer's length in estimated tokens, CDLA's blocks that go to the model, and the model
    calls and image patches they take with stitching and without; and the patches spent on upscaling.

    Units are made as the job makes them (:func:`layout_pages`, ``layout_units``);
    patches are counted by the checkpoint's image processor within each unit's
    pixel bounds. A crop below the block minimum (112,896 pixels) is enlarged
    to it, as PaddleX does: ``upscaling`` sets the patches such units get
    beside the patches of the same crops at their own size (no minimum).
    """
    import pymupdf
    from transformers import AutoImageProcessor

    from ocrbatch.job.units import layout_units
    from ocrbatch.layout.detect import load_layout

    chars = []
    for path in pdfs:
        with pymupdf.open(path) as doc:
            chars += [len(page.get_text()) for page in doc]
    processor = AutoImageProcessor.from_pretrained(model)
    smallest = (processor.patch_size * processor.merge_size) ** 2  # one image token: the processor's floor

    def patches(unit, low: int) -> int:
        bounds = {"min_pixels": low, "max_pixels": unit.pixel_bounds[1]}
        return processor.get_number_of_image_patches(unit.image.height, unit.image.width, images_kwargs=bounds)

    facts: dict = {"text_chars": chars, "text_tokens_estimated": [round(c / CHARS_PER_TOKEN) for c in chars],
                   "model_blocks": [], "tables": []}
    upscaling = {}
    for stitch, mode in ((True, "stitched"), (False, "unstitched")):
        calls, page_patches, by_label = [], [], {}
        detector = load_layout("cdla", threads=threads)
        for image, blocks, _ in layout_pages([str(p) for p in pdfs], dpi, detector,
                                             processor.size.longest_edge):
            units, _ = layout_units(image, blocks, stitch)
            calls.append(len(units))
            page_patches.append(0)
            for unit in units:
                given, own = patches(unit, unit.pixel_bounds[0]), patches(unit, smallest)
                page_patches[-1] += given
                if given > own:
                    label = unit.block.label + (" (stitched)" if unit.stitched else "")
                    entry = by_label.setdefault(label, {"units": 0, "patches": 0, "patches_at_own_size": 0})
                    entry["units"] += 1
                    entry["patches"] += given
                    entry["patches_at_own_size"] += own
            if stitch:
                recognised = [b.label for b in blocks if b.prompt is not None]
                facts["model_blocks"].append(len(recognised))
                facts["tables"].append(recognised.count("table"))
        facts[f"model_calls_{mode}"], facts[f"image_patches_{mode}"] = calls, page_patches
        extra = sum(e["patches"] - e["patches_at_own_size"] for e in by_label.values())
        upscaling[mode] = {"units": sum(e["units"] for e in by_label.values()),
                           "patches": sum(e["patches"] for e in by_label.values()),
                           "patches_at_own_size": sum(e["patches_at_own_size"] for e in by_label.values()),
                           "extra_patches_share_of_all": round(extra / sum(page_patches), 3),
                           "by_label": dict(sorted(by_label.items()))}
    facts["upscaling"] = upscaling
    return facts


def measure_layout(args, work: Path) -> dict:
    """Whole pages vs layout blocks on report pages, beside transformers float32 on the whole pages and on the
    same blocks.

    Every engine decodes the same number of output tokens per page on
    average: whole pages ``page_tokens`` each; in layout mode every model
    call the same share, ``page_tokens`` times the pages over all the calls
    (blocks, or with stitching the stitched units), so the run's total is
    the same (end-of-sentence and the loop guard off). ``--stitch on off``
    runs layout mode both ways, to compare model calls, image patches and
    pages per minute. The fair anchor, transformers on the same blocks
    (:func:`child_transformers_blocks`), runs with each stitch setting, so
    both sides make the same model calls on the same crops.
    """
    from ocrbatch.model.gguf import convert

    if args.quick:
        args.pages, args.page_tokens = min(args.pages, 2), min(args.page_tokens or 16, 16)
    model = args.model
    if model is None:
        from ocrbatch.dev.model import make_model

        model = str(make_model(work / "tiny", size="tiny"))
    pdfs, images = make_report_pages(work / "pages", args.pages, args.dpi, args.max_pixels, args.page_kinds)
    facts = {"kinds": [args.page_kinds[i % len(args.page_kinds)] for i in range(len(images))],
             **report_page_facts(pdfs, model, args.dpi, args.threads)}
    page_tokens = args.page_tokens or round(sum(facts["text_tokens_estimated"]) / len(images))
    block_tokens = max(1, round(page_tokens * len(images) / sum(facts["model_blocks"])))
    unit_tokens = max(1, round(page_tokens * len(images) / sum(facts["model_calls_stitched"])))
    convert(model, "Q4_K_M")  # cached: no run pays for the conversion
    results: dict = {"machine": machine_info(), "settings": {
        "model": model, "pages": len(images), "papers": [p.stem for p in pdfs], "page_kinds": args.page_kinds,
        "dpi": args.dpi, "max_pixels": args.max_pixels, "page_tokens": page_tokens, "block_tokens": block_tokens,
        "stitched_unit_tokens": unit_tokens, "stitch": args.stitch,
        "threads": args.threads, "quick": args.quick, **ENGINE_SETTINGS,
        "quant": "Q4_K_M"}, "pages": facts}
    base = {"model": model, "threads": args.threads}
    layouts = [layout for layout in args.layout if layout != "none"]

    def suffix(stitch: str) -> str:
        return "" if stitch == "on" else "-no-stitch"

    def tokens(layout: str, stitch: str) -> int:
        return page_tokens if layout == "none" else unit_tokens if stitch == "on" else block_tokens

    engines = {}
    if "none" in args.layout:
        engines["transformers-float32"] = run_child("transformers", {
            **base, "dtype": "float32", "tokens": page_tokens, "pages": [str(p) for p in images], "batched": False})
    for layout in layouts:
        for stitch in args.stitch:
            engines[f"transformers-float32-layout-{layout}{suffix(stitch)}"] = run_child("transformers-blocks", {
                **base, "dtype": "float32", "documents": [str(p) for p in pdfs], "layout": layout,
                "stitch": stitch == "on", "dpi": args.dpi, "tokens": tokens(layout, stitch)})
    for vision in args.vision_dtypes:
        for layout in args.layout:
            for stitch in (["on"] if layout == "none" else args.stitch):
                engines[f"ocrbatch-Q4_K_M-vision-{vision}-layout-{layout}{suffix(stitch)}"] = run_child("ocrbatch", {
                    **base, "quant": "Q4_K_M", "vision_dtype": vision, "pages_dir": str(work / "pages" / "docs"),
                    "layout": layout, "stitch": stitch == "on", "dpi": args.dpi, "max_pixels": args.max_pixels,
                    "tokens": tokens(layout, stitch), **ENGINE_SETTINGS})
    results["engines"] = engines
    tf32 = engines.get("transformers-float32", {})
    compared = ("pages_per_min", "model_calls_per_page", "image_patches_per_page", "cpu_s_per_page")
    both_ways = set(args.stitch) == {"on", "off"}

    def stitched_vs_not(name: str) -> dict:
        return {key: ratio(engines.get(name, {}).get(key), engines.get(f"{name}-no-stitch", {}).get(key))
                for key in compared}

    ratios = {}
    for vision in args.vision_dtypes:
        def ours(layout: str, stitch: str = "on") -> dict:
            return engines.get(f"ocrbatch-Q4_K_M-vision-{vision}-layout-{layout}{suffix(stitch)}", {})

        whole = ours("none")
        ratios[f"vision-{vision}"] = {
            # The fair anchor first: the same blocks (and stitched units) through transformers float32.
            **{f"pages_per_min_{layout}{suffix(stitch).replace('-', '_')}_vs_transformers_fp32_same_blocks": ratio(
                ours(layout, stitch).get("pages_per_min"),
                engines.get(f"transformers-float32-layout-{layout}{suffix(stitch)}", {}).get("pages_per_min"))
               for layout in layouts for stitch in args.stitch},
            # CPU seconds per page: what the pages cost, much less moved by other jobs' load
            **{f"cpu_s_per_page_transformers_fp32_same_blocks_vs_{layout}{suffix(stitch).replace('-', '_')}": ratio(
                engines.get(f"transformers-float32-layout-{layout}{suffix(stitch)}", {}).get("cpu_s_per_page"),
                ours(layout, stitch).get("cpu_s_per_page"))
               for layout in layouts for stitch in args.stitch},
            "pages_per_min_whole_page_vs_transformers_fp32": ratio(whole.get("pages_per_min"),
                                                                   tf32.get("pages_per_min")),
            "cpu_s_per_page_transformers_fp32_vs_whole_page": ratio(tf32.get("cpu_s_per_page"),
                                                                    whole.get("cpu_s_per_page")),
            **{f"{layout}_vs_whole_page": {
                key: ratio(ours(layout).get(key), whole.get(key))
                for key in ("pages_per_min", "vision_s_per_page", "image_patches_per_page", "cpu_s_per_page")}
               for layout in layouts if "none" in args.layout},
            **{f"pages_per_min_{layout}_vs_transformers_fp32": ratio(ours(layout).get("pages_per_min"),
                                                                    tf32.get("pages_per_min"))
               for layout in layouts if "none" in args.layout},
            **{f"{layout}_stitched_vs_not": stitched_vs_not(f"ocrbatch-Q4_K_M-vision-{vision}-layout-{layout}")
               for layout in layouts if both_ways},
        }
    if both_ways:  # what stitching buys the anchor itself
        ratios["transformers-float32"] = {f"{layout}_stitched_vs_not": stitched_vs_not(
            f"transformers-float32-layout-{layout}") for layout in layouts}
    results["ratios"] = ratios
    results["notes"] = args.note
    return results


def add_ratios(results: dict) -> None:
    """Ratios between the engines of one run, and the benchmark issue's targets (None: not measured)."""
    engines = results["engines"]
    tf32, tbf16 = engines.get("transformers-float32", {}), engines.get("transformers-bfloat16", {})
    ours = {k: v for k, v in engines.items() if k.startswith("ocrbatch-") and "pages_per_min" in v}
    fastest = max(ours, key=lambda k: ours[k]["pages_per_min"]) if ours else None
    best = ours.get(fastest, {})
    q4_runs = [v for k, v in ours.items() if "Q4_K_M" in k] + results.get("scaling", [])
    leanest = min(q4_runs, key=lambda v: v.get("peak_rss_total_mb") or float("inf"), default={})
    peer = engines.get("llama.cpp-mmproj-Q4_K_M", {})
    q4 = results["language_model"].get("Q4_K_M", {})
    exact = {k: v for k, v in ours.items() if k.endswith("vision-float32")}
    fastest_exact = max(exact, key=lambda k: exact[k]["pages_per_min"]) if exact else None
    results["ratios"] = {
        "fastest_ocrbatch_config": fastest,
        "pages_per_min_vs_transformers_fp32": ratio(best.get("pages_per_min"), tf32.get("pages_per_min")),
        "pages_per_min_vs_transformers_bf16": ratio(best.get("pages_per_min"), tbf16.get("pages_per_min")),
        "fastest_float32_vision_config": fastest_exact,
        "float32_vision_pages_per_min_vs_transformers_fp32": ratio(ours.get(fastest_exact, {}).get("pages_per_min"),
                                                                   tf32.get("pages_per_min")),
        "decode_tok_s_vs_transformers_fp32": ratio(q4.get("decode_tok_s"), tf32.get("decode_tok_s")),
        "decode_tok_s_4_sequences_vs_transformers_fp32_batch_4": ratio(q4.get("decode_tok_s_4_sequences"),
                                                                       tf32.get("decode_tok_s_4_sequences")),
        "decode_tok_s_8_sequences_vs_transformers_fp32_one_page": ratio(q4.get("decode_tok_s_8_sequences"),
                                                                        tf32.get("decode_tok_s")),
        "leanest_q4_k_m_run_peak_rss_total_mb": leanest.get("peak_rss_total_mb"),
        "peak_rss_vs_transformers_fp32": ratio(leanest.get("peak_rss_total_mb"), tf32.get("peak_rss_mb")),
        "pages_per_min_vs_llama_cpp_mmproj": ratio(best.get("pages_per_min"), peer.get("pages_per_min")),
    }
    r = results["ratios"]

    def check(value, passes):
        return None if value is None else passes(value)

    results["targets"] = {
        "pages_per_min >= 4x transformers fp32": check(r["pages_per_min_vs_transformers_fp32"], lambda v: v >= 4),
        "pages_per_min >= 2.5x transformers bf16": check(r["pages_per_min_vs_transformers_bf16"],
                                                         lambda v: v >= 2.5),
        "decode tok/s >= 6x transformers fp32 (one sequence each)": check(r["decode_tok_s_vs_transformers_fp32"],
                                                                          lambda v: v >= 6),
        "peak RSS Q4_K_M <= 35% of transformers fp32": check(r["peak_rss_vs_transformers_fp32"], lambda v: v <= 0.35),
        "faster than llama.cpp mmproj path": check(r["pages_per_min_vs_llama_cpp_mmproj"], lambda v: v > 1),
    }


if __name__ == "__main__":
    main()
