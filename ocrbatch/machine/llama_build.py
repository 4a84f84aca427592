"""How llama-cpp-python is built for the machine it will run on (used by ``scripts/install.sh``).

Standard library only: the install script runs this file before ocrbatch's
dependencies exist (``python ocrbatch/machine/llama_build.py wheel``).

Two recipes, chosen by the machine's architecture:

* **x86-64: one portable wheel with runtime CPU dispatch.** llama.cpp's
  ``GGML_BACKEND_DL`` + ``GGML_CPU_ALL_VARIANTS`` build the CPU backend several
  times, each for one instruction-set level, as loadable modules; at start-up
  ggml scores every module against the CPU it runs on and loads the best one.
  The same wheel runs on an AVX2-only laptop, an AVX-512 Zen 4 without AVX-VNNI
  and an Intel server with AMX, so a wheel cache or an image made on one machine
  is safe on another. Two edits to the vendored build list: the
  ``sapphirerapids`` (AMX) variant is left out, because llama.cpp's AMX kernels
  crash quantized models on the AMX virtual machines this project runs on (AMX
  machines load the ``zen4`` variant: AVX-512 with VNNI, VBMI and BF16), and
  variants that add nothing a kept one lacks on common CPUs are left out to keep
  the build to about half the time (see :data:`X86_VARIANTS`).
* **Other architectures (aarch64, ...): a native build** (``GGML_NATIVE``: the
  compiler's ``-mcpu=native``), which uses exactly what the build machine has.
  Such a wheel is only safe on a CPU with the same features, so its cache key
  includes them.

Either way the install then runs a self-check (``ocrbatch doctor``), which
decodes with every quant in a child process: a crash fails the install.

With a CUDA toolkit and an NVIDIA GPU (``nvidia-smi -L`` lists one), the wheel
also gets llama.cpp's CUDA backend, as one more loadable module (absent driver:
the module is skipped and decoding stays on the CPU). ``OCRBATCH_LLAMA_CUDA=1``
forces it where no GPU is visible at build time (an image built for GPU
machines), ``=0`` keeps it off.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# Bump when the recipe changes in a way the flags below do not show.
RECIPE_VERSION = 2

# CPU variants built on x86-64, weakest first; ggml loads the best one the CPU supports.
# x64 is the SSE baseline every x86-64 CPU runs; haswell is AVX2 (most laptops, cloud VMs,
# Zen 1-3); skylakex AVX-512; icelake adds VBMI and VNNI; zen4 adds BF16 (Zen 4/5 and every
# Intel with AMX, whose own variant is left out); alderlake is AVX2 with AVX-VNNI (Intel client
# CPUs without AVX-512). Left out from llama.cpp's list: sse42, sandybridge, ivybridge,
# piledriver (pre-AVX2 CPUs run x64), cannonlake, cascadelake, cooperlake (they run skylakex or
# icelake) and sapphirerapids (AMX, see the module docstring).
X86_VARIANTS = ("x64", "haswell", "skylakex", "icelake", "zen4", "alderlake")
AMX_VARIANT = "sapphirerapids"

# Features that matter to a native build's kernels, per architecture (names as in /proc/cpuinfo).
NATIVE_KEY_FEATURES = {
    "aarch64": ("asimd", "asimddp", "asimdhp", "sve", "sve2", "i8mm", "bf16", "sme"),
}


@dataclass(frozen=True)
class Machine:
    arch: str  # platform.machine(), normalised: x86_64, aarch64, ...
    cpu_model: str
    features: frozenset[str]
    cuda: bool


@dataclass(frozen=True)
class Recipe:
    """How to build llama-cpp-python for one kind of machine."""

    arch: str
    dispatch: bool  # runtime CPU dispatch (portable) rather than a native build
    cuda: bool
    cmake_args: tuple[str, ...]
    native_features: tuple[str, ...]  # what a native build depends on; () for a portable one

    @property
    def key(self) -> str:
        """The wheel cache key: equal keys mean a wheel built for one runs on the other."""
        text = "|".join([LLAMA_CPP_PYTHON_VERSION, str(RECIPE_VERSION), self.arch, *self.cmake_args,
                         *self.native_features, ",".join(X86_VARIANTS) if self.dispatch else ""])
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        kind = "dispatch" if self.dispatch else "native"
        return f"{self.arch}-{kind}{'-cuda' if self.cuda else ''}-{digest}"


def cpu_info(text: str | None = None) -> tuple[str, frozenset[str]]:
    """The CPU's model name and feature flags from ``/proc/cpuinfo`` (x86 "flags", ARM "Features")."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return platform.processor() or "unknown", frozenset()
    model, features = "", set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif name in ("flags", "features") and not features:
            features = set(value.split())
    return model or platform.processor() or "unknown", frozenset(features)


def cuda_wanted() -> bool:
    """Whether to build the CUDA backend: a toolkit (nvcc) and a visible GPU, unless forced."""
    forced = os.environ.get("OCRBATCH_LLAMA_CUDA", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if not shutil.which("nvcc"):
        return False
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def this_machine() -> Machine:
    model, features = cpu_info()
    arch = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    return Machine(arch, model, features, cuda_wanted())


def recipe_for(machine: Machine) -> Recipe:
    cuda = ("-DGGML_CUDA=ON",) if machine.cuda else ()
    if machine.arch == "x86_64":
        args = ("-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON",
                # The loadable backends go beside libllama.so (ocrbatch loads them from there).
                "-DCMAKE_INSTALL_BINDIR=llama_cpp/lib", *cuda)
        return Recipe(machine.arch, True, machine.cuda, args, ())
    relevant = NATIVE_KEY_FEATURES.get(machine.arch)
    features = tuple(sorted(machine.features & set(relevant))) if relevant else tuple(sorted(machine.features))
    args = ("-DGGML_NATIVE=ON", "-DGGML_BACKEND_DL=ON", "-DCMAKE_INSTALL_BINDIR=llama_cpp/lib", *cuda)
    return Recipe(machine.arch, False, machine.cuda, args, features)


def restrict_x86_variants(cmake_text: str) -> str:
    """ggml's ``src/CMakeLists.txt`` with only :data:`X86_VARIANTS` in its x86 variant list.

    Raises ``RuntimeError`` when the list is not where this expects it (a new
    llama.cpp): building every variant, AMX included, must not happen silently.
    """
    start = cmake_text.find('if (GGML_SYSTEM_ARCH STREQUAL "x86")', cmake_text.find("GGML_CPU_ALL_VARIANTS)"))
    end = cmake_text.find("elseif", start)
    if start < 0 or end < 0:
        raise RuntimeError("ggml's CPU variant list was not found in ggml/src/CMakeLists.txt")
    block = cmake_text[start:end]
    found = re.findall(r"ggml_add_cpu_backend_variant\(([\w.]+)", block)
    missing = set(X86_VARIANTS) - set(found)
    if missing or AMX_VARIANT not in found:
        raise RuntimeError(f"ggml's x86 CPU variants changed (found {found}); update X86_VARIANTS")
    kept = re.sub(r"^\s*ggml_add_cpu_backend_variant\(([\w.]+)[^\n]*\n",
                  lambda m: m.group(0) if m.group(1) in X86_VARIANTS else "", block, flags=re.M)
    return cmake_text[:start] + kept + cmake_text[end:]


def build_wheel(recipe: Recipe, wheel_dir: Path) -> Path:
    """Download llama-cpp-python's source, apply the recipe and build its wheel into ``wheel_dir``."""
    with tempfile.TemporaryDirectory(prefix="ocrbatch-llama-build-") as scratch:
        scratch = Path(scratch)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(scratch)], check=True)
        archive = next(scratch.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(scratch, filter="data")
        source = next(p for p in scratch.iterdir() if p.is_dir())
        if recipe.dispatch:
            cmake_file = source / "vendor/llama.cpp/ggml/src/CMakeLists.txt"
            cmake_file.write_text(restrict_x86_variants(cmake_file.read_text()))
        env = dict(os.environ, CMAKE_ARGS=" ".join(recipe.cmake_args),
                   CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
        staging = scratch / "wheel"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-cache-dir",
                        str(source), "-w", str(staging)], check=True, env=env)
        built = next(staging.glob("llama_cpp_python-*.whl"))
        wheel_dir.mkdir(parents=True, exist_ok=True)
        # Moved in whole, so an interrupted build never leaves a wheel that looks finished.
        target = wheel_dir / built.name
        shutil.move(str(built), target)
        return target


def wheel_cache_dir() -> Path:
    return Path(os.environ.get("OCRBATCH_WHEEL_CACHE", Path.home() / ".cache" / "ocrbatch-wheels"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["plan", "wheel"],
                        help="plan: print the recipe; wheel: print the path of a wheel for this machine, "
                             "building it first when the cache has none")
    args = parser.parse_args(argv)
    machine = this_machine()
    recipe = recipe_for(machine)
    wheel_dir = wheel_cache_dir() / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}-{recipe.key}"
    if args.command == "plan":
        print(f"cpu: {machine.cpu_model}\narch: {machine.arch}\n"
              f"build: {'runtime CPU dispatch, variants ' + ' '.join(X86_VARIANTS) if recipe.dispatch else 'native'}"
              f"{' + CUDA' if recipe.cuda else ''}\ncmake: {' '.join(recipe.cmake_args)}\nwheel cache: {wheel_dir}")
        return 0
    cached = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    if cached:
        print(cached[-1])
        return 0
    print(f"building llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} for {machine.arch} "
          f"({'runtime CPU dispatch' if recipe.dispatch else 'native'}{', CUDA' if recipe.cuda else ''}); "
          "this takes a while the first time", file=sys.stderr)
    print(build_wheel(recipe, wheel_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
