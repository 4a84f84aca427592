#!/usr/bin/env bash
# Install ocrbatch and its test tools into the active virtual environment.
#
# torch==2.13.0 first: a bare "torch" requirement pulls a multi-GB CUDA build.
# llama-cpp-python is compiled from source (10-20 minutes on 2 cores) for the
# AVX-512 family but without AMX: on the AMX machines (VMs) this project runs on,
# llama.cpp's AMX kernels crash quantized models (Q8_0, Q4_K_M, ...) with a
# segmentation fault, and a native build (-march=native) turns them on. The wheel
# is kept under ~/.cache/ocrbatch-wheels, keyed by these flags, because pip's own
# wheel cache ignores build flags and would hand back a native build.
set -euo pipefail

LLAMA_VERSION=0.3.36
LLAMA_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
-DGGML_AMX_BF16=OFF"
WHEELS="${OCRBATCH_WHEEL_CACHE:-$HOME/.cache/ocrbatch-wheels}/llama-cpp-python-$LLAMA_VERSION-$(echo "$LLAMA_FLAGS" | sha256sum | cut -c1-12)"

python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
if ! compgen -G "$WHEELS/llama_cpp_python-*.whl" > /dev/null; then
    CMAKE_ARGS="$LLAMA_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        python -m pip wheel --quiet --no-deps --no-cache-dir "llama-cpp-python==$LLAMA_VERSION" -w "$WHEELS"
fi
python -m pip install --quiet --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-*.whl
python -m pip install --quiet -e '.[test]'
