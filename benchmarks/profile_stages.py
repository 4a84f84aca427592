"""Where the time goes: the vision encoder's PyTorch ops, and a llama.cpp decode step by tensor.

    python benchmarks/profile_stages.py vision --model MODEL_DIR --dtype int8 --image-size 448
    python benchmarks/profile_stages.py decode --model MODEL_DIR --quant Q4_K_M --sequences 1

Prints JSON: milliseconds per page (vision) or per decode step (decode) for
the most expensive entries, and the share of the measured total. The decode
profile times every node of llama.cpp's graph through the scheduler's eval
callback, which computes one node at a time: the total is a little above an
unprofiled step, the split between tensors is what to read.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench import _lm_requests, make_pages, time_generation


def profile_vision(model: str, dtype: str, image_size: int, threads: int, top: int) -> dict:
    """The encoder's PyTorch ops for one page (torch.profiler), after a warm-up page."""
    import tempfile

    import torch
    from PIL import Image
    from torch.profiler import ProfilerActivity, profile

    from ocrbatch.model.vision import VisionEncoder

    torch.set_num_threads(threads)
    encoder = VisionEncoder(model, dtype=dtype)
    with tempfile.TemporaryDirectory() as scratch:
        [page] = [Image.open(p).convert("RGB") for p in make_pages(Path(scratch), 1, image_size)]
    encoder.encode([page])
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        begin = time.perf_counter()
        encoder.encode([page])
        wall_s = time.perf_counter() - begin
    ops = Counter({event.key: event.self_cpu_time_total / 1000 for event in trace.key_averages()})
    return _report(ops, wall_s * 1000, top, unit="ms_per_page")


class _TensorHead(ctypes.Structure):
    """The leading fields of ggml.h's ``struct ggml_tensor`` up to its name (ggml in llama-cpp-python 0.3.36)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


def _group(name: str) -> str:
    """``ffn_up-5`` -> ``ffn_up``: one entry per kind of tensor across layers."""
    if name.startswith("node_"):
        return "(unnamed ops)"
    stem, _, layer = name.rpartition("-")
    return stem if stem and layer.isdigit() else name


def profile_decode(model: str, quant: str, sequences: int, tokens: int, image_size: int, threads: int,
                   top: int) -> dict:
    """Milliseconds per decode step spent in each named tensor of the graph (layer number dropped)."""
    import llama_cpp

    from ocrbatch.model.gguf import convert
    from ocrbatch.model.language import LanguageModel

    spent: Counter = Counter()
    clock = {"last": 0.0, "on": False}

    def on_node(tensor, ask, _user_data):
        if ask:
            return True  # observe every node: the scheduler then computes them one by one
        now = time.perf_counter()
        if clock["on"]:
            spent[_group(_TensorHead.from_address(tensor).name.decode(errors="replace"))] += now - clock["last"]
        clock["last"] = time.perf_counter()
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(on_node)
    create_context = llama_cpp.llama_init_from_model

    def with_callback(llama_model, params):
        params.cb_eval = callback
        return create_context(llama_model, params)

    llama_cpp.llama_init_from_model = with_callback
    try:
        spec = {"model": model, "tokens": tokens, "image_size": image_size}
        requests = _lm_requests(spec, sequences)
        n_ctx = sequences * (requests[0].prompt.n_prompt_tokens + tokens)
        with LanguageModel(convert(model, quant), n_ctx=n_ctx, n_seq_max=sequences, n_threads=threads) as lm:
            _, decode_s, decoded = time_generation(lm, requests, on_prefilled=lambda: clock.update(on=True))
    finally:
        llama_cpp.llama_init_from_model = create_context
    steps = decoded / sequences
    per_step = Counter({name: seconds * 1000 / steps for name, seconds in spent.items()})
    return _report(per_step, decode_s * 1000 / steps, top, unit="ms_per_step")


def _report(costs: Counter, wall_ms: float, top: int, unit: str) -> dict:
    total = sum(costs.values())
    return {"wall_" + unit: round(wall_ms, 2), "measured_" + unit: round(total, 2),
            "top": [{"name": name, unit: round(ms, 2), "share": round(ms / total, 3)}
                    for name, ms in costs.most_common(top)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["vision", "decode"])
    parser.add_argument("--model", required=True, help="Model folder.")
    parser.add_argument("--dtype", default="float32", help="Vision dtype (vision).")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--quant", default="Q4_K_M", help="GGUF quantization (decode).")
    parser.add_argument("--sequences", type=int, default=1, help="Sequences decoding together (decode).")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    if args.stage == "vision":
        result = profile_vision(args.model, args.dtype, args.image_size, args.threads, args.top)
    else:
        result = profile_decode(args.model, args.quant, args.sequences, args.tokens, args.image_size, args.threads,
                                args.top)
    print(json.dumps({**vars(args), **result}, indent=2))


if __name__ == "__main__":
    main()
