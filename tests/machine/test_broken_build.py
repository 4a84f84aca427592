"""A llama.cpp build that cannot run here is the machine's fault, never the pages'.

The broken build is played by ``tests/broken_build/sitecustomize.py`` in the real
command line and its spawned workers (see there); ``ocrbatch doctor`` and the
install's self-check are run the same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ocrbatch.machine import llama_build
from ocrbatch.records.sqlite import checkpoint_path_for

BROKEN_BUILD = Path(__file__).parents[1] / "broken_build"


def run_cli(*args, fault: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if fault:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BROKEN_BUILD), env.get("PYTHONPATH")]))
        env["OCRBATCH_TEST_BROKEN_BUILD"] = fault
    return subprocess.run([sys.executable, "-m", "ocrbatch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def page_states(out: Path) -> dict[str, int]:
    with sqlite3.connect(checkpoint_path_for(out)) as db:
        return dict(db.execute("SELECT status, count(*) FROM pages GROUP BY status").fetchall())


@pytest.mark.slow
@pytest.mark.parametrize("fault, said", [
    ("sigill-at-warm-up", "killed by SIGILL during its start-up warm-up"),
    ("segfault-on-every-page", "crashed on 3 different pages, each running alone"),
])
def test_a_broken_build_exits_3_with_pages_pending_and_a_good_build_finishes_them(tiny_model, docs, tmp_path,
                                                                                   fault, said):
    out = tmp_path / "out.jsonl"
    args = ["run", docs, "--out", out, "--model", tiny_model, "--quant", "Q8_0", "--max-tokens", "6", "--dpi", "72",
            "--layout", "none", "--workers", "2", "--seqs-per-worker", "2"]
    broken = run_cli(*args, fault=fault)
    assert broken.returncode == 3, broken.stderr
    assert said in broken.stderr and "ocrbatch doctor" in broken.stderr
    assert page_states(out) == {"pending": 6}  # no page charged

    fixed = run_cli(*args)  # the same command, no --retry-failed
    assert fixed.returncode == 0, fixed.stderr
    assert page_states(out) == {"ok": 6}
    assert "6 pages processed (6 ok, 0 failed), 0 already done" in fixed.stderr


@pytest.mark.slow
def test_doctor_reports_the_machine_and_passes_its_self_check(tmp_path):
    result = run_cli("doctor", "--quant", "Q4_K_M", "--quant", "F32", "--cache-dir", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for topic in ("cpu", "cpu features", "llama.cpp", "llama.cpp system info", "llama.cpp devices", "torch",
                  "torch.compile", "onnxruntime", "model cache", "self-check Q4_K_M", "self-check F32"):
        assert f"\n{topic}:" in "\n" + result.stdout, topic
    assert "self-check Q4_K_M: decoded in" in result.stdout


@pytest.mark.slow
def test_doctor_fails_naming_the_cpu_and_the_fix_when_decoding_crashes(tmp_path):
    result = run_cli("doctor", "--quant", "Q4_K_M", "--cache-dir", tmp_path, fault="sigill-at-warm-up")
    assert result.returncode == 1, result.stdout + result.stderr
    machine = llama_build.this_machine()
    line = next(line for line in result.stdout.splitlines() if line.startswith("self-check Q4_K_M"))
    assert "killed by SIGILL" in line
    assert machine.cpu_model in result.stdout and "scripts/install.sh" in result.stdout


def test_the_self_check_fails_when_its_decode_child_crashes(tiny_model, tmp_path):
    from ocrbatch.machine.doctor import self_check_findings

    def crashing_child(quant, model, cache):
        return [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]

    [finding] = self_check_findings(["Q8_0"], tmp_path, command=crashing_child)
    assert finding.problem and "cannot decode Q8_0 on this CPU" in finding.problem
    assert finding.value == "killed by SIGILL (an instruction this CPU does not have)"


# -- the build recipe -------------------------------------------------------------------

ZEN4 = "model name : AMD EPYC 9R14\nflags : fpu sse4_2 avx avx2 fma f16c avx512f avx512_vnni avx512_bf16\n"
AMX = ZEN4.replace("AMD EPYC 9R14", "Intel Xeon") + "flags : avx_vnni amx_tile amx_int8\n"


def machine(arch: str, cpuinfo: str, cuda: bool = False) -> llama_build.Machine:
    model, features = llama_build.cpu_info(cpuinfo)
    return llama_build.Machine(arch, model, features, cuda)


def test_cpu_info_reads_x86_and_arm_cpuinfo():
    assert llama_build.cpu_info(ZEN4) == ("AMD EPYC 9R14", frozenset(
        "fpu sse4_2 avx avx2 fma f16c avx512f avx512_vnni avx512_bf16".split()))
    model, features = llama_build.cpu_info("processor : 0\nFeatures : fp asimd asimddp sve\nCPU part : 0xd0c\n")
    assert {"asimd", "sve"} <= features


def test_x86_wheels_dispatch_at_run_time_and_are_shared_across_cpu_feature_sets():
    zen4, amx = llama_build.recipe_for(machine("x86_64", ZEN4)), llama_build.recipe_for(machine("x86_64", AMX))
    assert zen4.dispatch and "-DGGML_CPU_ALL_VARIANTS=ON" in zen4.cmake_args
    assert not any("AVX" in arg or "AMX" in arg or arg == "-DGGML_NATIVE=ON" for arg in zen4.cmake_args)
    # One portable wheel: the CPU's features are chosen among at load time, so they are not in the key.
    assert zen4.key == amx.key
    assert llama_build.recipe_for(machine("x86_64", ZEN4, cuda=True)).key != zen4.key


def test_native_wheels_are_keyed_by_the_cpu_features_they_were_built_for():
    base = "Features : fp asimd asimddp\n"
    plain = llama_build.recipe_for(machine("aarch64", base))
    sve = llama_build.recipe_for(machine("aarch64", base.replace("asimddp", "asimddp sve")))
    assert not plain.dispatch and "-DGGML_NATIVE=ON" in plain.cmake_args
    assert plain.key != sve.key
    assert plain.key != llama_build.recipe_for(machine("x86_64", ZEN4)).key


def test_the_amx_variant_is_left_out_of_the_build_and_a_changed_list_stops_it():
    text = """if (GGML_CPU_ALL_VARIANTS)
    if (GGML_SYSTEM_ARCH STREQUAL "x86")
        ggml_add_cpu_backend_variant(x64)
        ggml_add_cpu_backend_variant(sse42              SSE42)
        ggml_add_cpu_backend_variant(haswell            SSE42 AVX F16C FMA AVX2 BMI2)
        ggml_add_cpu_backend_variant(skylakex           SSE42 AVX F16C FMA AVX2 BMI2 AVX512)
        ggml_add_cpu_backend_variant(icelake            SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VBMI AVX512_VNNI)
        ggml_add_cpu_backend_variant(zen4           SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16)
        ggml_add_cpu_backend_variant(alderlake          SSE42 AVX F16C FMA AVX2 BMI2 AVX_VNNI)
        if (NOT MSVC)
            ggml_add_cpu_backend_variant(sapphirerapids SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16 AMX_TILE AMX_INT8)
        endif()
    elseif(GGML_SYSTEM_ARCH STREQUAL "ARM")
        ggml_add_cpu_backend_variant(armv8.0_1)
"""
    kept = llama_build.restrict_x86_variants(text)
    assert "sapphirerapids" not in kept and "sse42  " not in kept
    for variant in llama_build.X86_VARIANTS:
        assert f"ggml_add_cpu_backend_variant({variant}" in kept
    assert "ggml_add_cpu_backend_variant(armv8.0_1)" in kept
    with pytest.raises(RuntimeError, match="update X86_VARIANTS"):
        llama_build.restrict_x86_variants(text.replace("zen4", "zen5"))


def test_the_installed_build_loads_its_cpu_backend_from_a_variant_this_cpu_runs():
    from ocrbatch.machine.llama_runtime import backend_devices, cpu_variants, system_info

    variants = cpu_variants()
    if not variants:
        pytest.skip("this llama-cpp-python has its CPU backend linked in (not built by scripts/install.sh)")
    if llama_build.this_machine().arch == "x86_64":
        assert set(variants) == set(llama_build.X86_VARIANTS)
        assert variants["x64"] > 0  # the baseline runs on every x86-64 CPU
    assert any(name == "CPU" for name, _ in backend_devices())
    assert "CPU :" in system_info()


# -- the same build on other CPUs ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("qemu-x86_64") or llama_build.this_machine().arch != "x86_64",
                    reason="needs Debian's qemu-user on x86-64")
@pytest.mark.parametrize("cpu, variant", [("EPYC-Rome", "haswell"), ("Westmere", "x64")])
def test_the_build_decodes_on_cpus_without_avx512_or_avx(tiny_model, tmp_path, cpu, variant):
    """qemu-user runs the installed build as on an AVX2-only Zen 2 and a pre-AVX Westmere: ggml
    loads the variant those CPUs can run, and every kernel of a quantized decode runs on it."""
    from ocrbatch.machine.llama_runtime import cpu_variants
    from ocrbatch.model.gguf import convert

    if not cpu_variants():
        pytest.skip("this llama-cpp-python has its CPU backend linked in (not built by scripts/install.sh)")
    convert(tiny_model, "Q4_K_M", cache=tmp_path)  # converted here: the emulated child only decodes
    emulated = subprocess.run(["qemu-x86_64", "-cpu", cpu, sys.executable, "-m", "ocrbatch.machine.selfcheck", "Q4_K_M",
                               str(tiny_model), "--cache-dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=900)
    if emulated.returncode == -signal.SIGILL:
        culprit = _first_to_fail_on(cpu)
        if culprit in ENVIRONMENT_STEPS:
            pytest.skip(f"{culprit} dies with SIGILL on an emulated {cpu} on this machine, before llama.cpp "
                        "loads: this Python environment, not the llama.cpp build, cannot run there")
        pytest.fail(f"the build dies with SIGILL on an emulated {cpu} at: {culprit}")
    assert emulated.returncode == 0, emulated.stderr[-3000:]
    said = emulated.stdout.strip().splitlines()[-1]
    assert f"decoded with libggml-cpu-{variant}.so" in said, said
    assert "AVX512 = 1" not in said


# What the self-check child loads, in order; the first to die on an emulated CPU is the culprit.
ENVIRONMENT_STEPS = {"the Python interpreter": "pass", "numpy": "import numpy", "torch": "import torch",
                     "transformers": "import transformers.models.paddleocr_vl",
                     "the tokenizer libraries": "import sentencepiece, regex, tokenizers"}
BUILD_STEPS = {"llama.cpp's libraries and CPU backend": "from ocrbatch.machine.llama_runtime import system_info; "
                                                         "print(system_info())"}


def _first_to_fail_on(cpu: str) -> str:
    for step, code in {**ENVIRONMENT_STEPS, **BUILD_STEPS}.items():
        run = subprocess.run(["qemu-x86_64", "-cpu", cpu, sys.executable, "-c", code], capture_output=True, timeout=600)
        if run.returncode == -signal.SIGILL:
            return step
    return "the decode (every library loaded alone)"


def test_cuda_is_built_only_with_a_toolkit_and_a_gpu_unless_forced(monkeypatch, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    monkeypatch.setenv("PATH", str(fake_bin))
    monkeypatch.delenv("OCRBATCH_LLAMA_CUDA", raising=False)
    assert not llama_build.cuda_wanted()  # no nvcc
    for tool, script in (("nvcc", "exit 0"), ("nvidia-smi", "exit 9")):
        (fake_bin / tool).write_text(f"#!/bin/sh\n{script}\n")
        (fake_bin / tool).chmod(0o755)
    assert not llama_build.cuda_wanted()  # a toolkit, but no GPU answers
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-1)'\n")
    assert llama_build.cuda_wanted()
    monkeypatch.setenv("OCRBATCH_LLAMA_CUDA", "0")
    assert not llama_build.cuda_wanted()
    monkeypatch.setenv("OCRBATCH_LLAMA_CUDA", "1")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert llama_build.cuda_wanted()
    assert "-DGGML_CUDA=ON" in llama_build.recipe_for(llama_build.this_machine()).cmake_args
