"""``ocrbatch doctor``: what this machine has, what ocrbatch will use on it, and whether it works.

Each probe that loads native code (llama.cpp, ``torch.compile``) runs in a
child process, so a build that cannot run here is reported, not fatal to the
report. A :class:`Finding` is one line of the report; a ``problem`` means
something cannot work, and comes with its fix.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..model.gguf import QUANTS, cache_dir
from . import llama_build
from .selfcheck import check_quants, child_command, describe_exit

# The CPU features that decide llama.cpp's and PyTorch's kernels (names as /proc/cpuinfo has them).
KERNEL_FEATURES = ("sse4_2", "avx", "f16c", "fma", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
                   "avx512_vnni", "avx512vbmi", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
                   "asimd", "asimddp", "sve", "sve2", "i8mm")
PROBE_TIMEOUT_S = 180
REBUILD_FIX = ("rebuild llama.cpp for this machine: remove the cached wheel named in 'wheel cache' and run "
               "`bash scripts/install.sh` again (it builds for the CPU it runs on)")


@dataclass(frozen=True)
class Finding:
    topic: str
    value: str
    problem: str | None = None  # why it cannot work, and the fix; None when fine


def _probe(code: str) -> tuple[dict | None, str]:
    """Run ``code`` (which prints one JSON object) in a child; (its object, or None and why)."""
    try:
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"no answer within {PROBE_TIMEOUT_S} s"
    if child.returncode != 0:
        said = (child.stderr.strip().splitlines() or [""])[-1]
        return None, describe_exit(child.returncode) + (f": {said}" if said else "")
    return json.loads(child.stdout.strip().splitlines()[-1]), ""


_LLAMA_PROBE = """
import json
from ocrbatch.machine.llama_runtime import backend_devices, cpu_variants, system_info
import llama_cpp
print(json.dumps({"version": llama_cpp.__version__, "system_info": system_info(),
                  "variants": cpu_variants(), "devices": backend_devices()}))
"""

_TORCH_COMPILE_PROBE = """
import json, torch
def f(x):
    return torch.nn.functional.gelu(x @ x) + 1
try:
    torch.compile(f)(torch.ones(8, 8))
    print(json.dumps({"ok": True}))
except Exception as exc:
    print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}))
"""


def machine_findings(machine: llama_build.Machine) -> list[Finding]:
    features = " ".join(f for f in KERNEL_FEATURES if f in machine.features) or "none of the tracked ones"
    return [Finding("cpu", f"{machine.cpu_model} ({machine.arch}, {os.cpu_count()} logical cores)"),
            Finding("cpu features", features)]


def llama_findings(machine: llama_build.Machine) -> list[Finding]:
    recipe = llama_build.recipe_for(machine)
    wheels = llama_build.wheel_cache_dir() / f"llama-cpp-python-{llama_build.LLAMA_CPP_PYTHON_VERSION}-{recipe.key}"
    findings = [Finding("wheel cache", f"{wheels} ({'present' if wheels.is_dir() else 'absent'})")]
    info, why = _probe(_LLAMA_PROBE)
    if info is None:
        return findings + [Finding("llama.cpp", "cannot load", f"{why}; {REBUILD_FIX}")]
    variants = info["variants"]
    if variants:
        usable = {name: score for name, score in variants.items() if score > 0}
        chosen = max(usable, key=usable.get) if usable else None
        build = (f"runtime CPU dispatch, loads '{chosen}' here (built: {', '.join(variants)})"
                 if chosen else "runtime CPU dispatch, but no CPU variant runs on this CPU")
        problem = None if chosen else REBUILD_FIX
    else:
        build, problem = "CPU backend linked in (one instruction-set level, fixed at build time)", None
    devices = ", ".join(f"{name} ({description})" for name, description in info["devices"]) or "none"
    gpu = any(not name.startswith("CPU") for name, _ in info["devices"])
    findings += [
        Finding("llama.cpp", f"llama-cpp-python {info['version']}; {build}", problem),
        Finding("llama.cpp system info", info["system_info"]),
        Finding("llama.cpp devices", devices if gpu else f"{devices}; no GPU backend: decoding stays on the CPU"),
    ]
    return findings


def torch_findings() -> list[Finding]:
    import torch

    findings = [Finding("torch", f"{torch.__version__}, {torch.get_num_threads()} threads")]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        findings.append(Finding("cuda (vision)", names))
    else:
        findings.append(Finding("cuda (vision)", "no CUDA device: the vision encoder runs on the CPU"))
    compiled, why = _probe(_TORCH_COMPILE_PROBE)
    if compiled is None or not compiled["ok"]:
        reason = why or compiled["error"]
        findings.append(Finding("torch.compile", f"does not work here ({reason}): --vision-dtype int8 runs "
                                "uncompiled and slower; install a C++ compiler (g++) to fix"))
    else:
        findings.append(Finding("torch.compile", "works (int8 vision is compiled)"))
    return findings


def onnx_findings() -> list[Finding]:
    try:
        import onnxruntime
    except ImportError as exc:
        return [Finding("onnxruntime", "missing", f"{exc}; --layout cdla needs it: pip install onnxruntime")]
    return [Finding("onnxruntime", f"{onnxruntime.__version__}, providers {', '.join(onnxruntime.get_available_providers())}")]


def disk_findings(cache: str | Path | None) -> list[Finding]:
    findings = []
    for topic, folder in (("model cache", cache_dir(cache)), ("wheel cache folder", llama_build.wheel_cache_dir())):
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        free_gb = shutil.disk_usage(existing).free / 1e9
        problem = f"only {free_gb:.1f} GB free: a converted full-size model needs about 2 GB" if free_gb < 2 else None
        findings.append(Finding(topic, f"{folder} ({free_gb:.1f} GB free)", problem))
    return findings


def self_check_findings(quants=QUANTS, cache: str | Path | None = None, command=child_command) -> list[Finding]:
    machine = llama_build.this_machine()
    findings = []
    for check in check_quants(quants, cache, command):
        problem = None
        if not check.ok:
            problem = (f"llama.cpp cannot decode {check.quant} on this CPU ({machine.cpu_model}; "
                       f"{' '.join(f for f in KERNEL_FEATURES if f in machine.features)}); {REBUILD_FIX}")
        findings.append(Finding(f"self-check {check.quant}", check.detail, problem))
    return findings


def diagnose(cache: str | Path | None = None, self_check: bool = True, quants=QUANTS,
             command=child_command) -> list[Finding]:
    machine = llama_build.this_machine()
    findings = [*machine_findings(machine), Finding("python", f"{platform.python_version()} ({sys.executable})"),
                *llama_findings(machine), *torch_findings(), *onnx_findings(), *disk_findings(cache)]
    if self_check and not any(f.topic == "llama.cpp" and f.problem for f in findings):
        findings += self_check_findings(quants, cache, command)
    return findings
