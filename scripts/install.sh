#!/usr/bin/env bash
# Install ocrbatch and its test tools into the active virtual environment, for the machine it runs on.
#
# torch==2.13.0 first: a bare "torch" requirement pulls a multi-GB CUDA build.
# llama-cpp-python is compiled from source (15-30 minutes on 2 cores the first time) by
# ocrbatch/machine/llama_build.py, which says how: on x86-64 one wheel whose CPU backend is built for
# several instruction-set levels and picked at load time (it runs on any x86-64 CPU; AMX kernels
# left out), elsewhere a native build; with a CUDA toolkit and a GPU, the CUDA backend too.
# The wheel is kept under ~/.cache/ocrbatch-wheels ($OCRBATCH_WHEEL_CACHE), keyed by the recipe
# (and, for native builds, the CPU's features), because pip's own wheel cache ignores build
# flags. Last, `ocrbatch doctor` decodes with every quant in a child process: an install whose
# llama.cpp cannot run on this CPU fails here, not on every page of the first job.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python ocrbatch/machine/llama_build.py plan
wheel=$(python ocrbatch/machine/llama_build.py wheel)
python -m pip install --quiet --force-reinstall --no-deps "$wheel"
python -m pip install --quiet -e '.[test]'

if ! ocrbatch doctor; then
    echo "install: the self-check failed on this machine (see PROBLEM above); ocrbatch would fail every page" >&2
    exit 1
fi
