"""Importing llama-cpp-python once, with llama.cpp's log lines kept off the terminal.

llama.cpp logs every model load and quantization in detail; ocrbatch routes
that to Python logging and shows it only when ``OCRBATCH_LLAMA_LOG`` is set.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
import tempfile
from pathlib import Path


@functools.cache
def llama_cpp_module():
    """The ``llama_cpp`` module, initialised and quiet, with llama.cpp's backends loaded.

    ocrbatch's llama.cpp build (``scripts/install.sh``) keeps its CPU backend as
    loadable modules, one per instruction-set level, beside ``libllama.so``;
    ggml scores them against this CPU and loads the best. llama.cpp would only
    look beside the Python executable, so the folder is named here. Builds with
    the CPU backend linked in (a plain ``pip install``) already have one
    registered and are left as they are.
    """
    import llama_cpp

    level = logging.DEBUG if os.environ.get("OCRBATCH_LLAMA_LOG") else logging.ERROR
    logging.getLogger("llama-cpp-python").setLevel(level)
    ggml = ggml_library()
    if ggml.ggml_backend_reg_count() == 0:
        ggml.ggml_backend_load_all_from_path(str(llama_lib_dir()).encode())
    llama_cpp.llama_backend_init()
    return llama_cpp


def llama_lib_dir() -> Path:
    """The folder of llama-cpp-python's shared libraries (and of the backend modules)."""
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


@functools.cache
def ggml_library() -> ctypes.CDLL:
    """ggml's backend registry as ``libllama`` sees it, for the calls llama-cpp-python does not bind.

    Through ``libllama``'s own handle: a symbol looked up there resolves in the
    ``libggml`` it was linked with. Opening ``libggml.so`` by path would load a
    second copy (a wheel holds copies, not links, of ``libggml.so.0``) with a
    registry of its own, which llama.cpp never reads.
    """
    from llama_cpp import llama_cpp as bindings

    ggml = ctypes.CDLL(bindings._lib._name)
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load_all_from_path.restype = None
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_name.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_description.restype = ctypes.c_char_p
    return ggml


def backend_devices() -> list[tuple[str, str]]:
    """(name, description) of every device llama.cpp can use: ``CPU``, ``CUDA0``, ..."""
    llama_cpp_module()
    ggml = ggml_library()
    devices = []
    for index in range(ggml.ggml_backend_dev_count()):
        device = ggml.ggml_backend_dev_get(index)
        devices.append((ggml.ggml_backend_dev_name(device).decode(), ggml.ggml_backend_dev_description(device).decode()))
    return devices


def cpu_variants() -> dict[str, int]:
    """Each CPU backend module of the build (``haswell``, ``zen4``, ...) and ggml's score for this
    CPU (0: it cannot run here). The loaded one is the highest; a build with the CPU backend
    linked in has none."""
    return {name: score for name, (_, score) in _scored_cpu_modules().items()}


def best_cpu_module() -> Path | None:
    """The CPU backend module ggml loads on this CPU, or None (linked in, or none runs here).

    Other programs on llama-cpp-python (its own server) find it through
    ``GGML_BACKEND_PATH``: they would look only beside the Python executable.
    """
    usable = [(score, path) for path, score in _scored_cpu_modules().values() if score > 0]
    return max(usable)[1] if usable else None


def _scored_cpu_modules() -> dict[str, tuple[Path, int]]:
    scored = {}
    for module in sorted(llama_lib_dir().glob("libggml-cpu-*.so")):
        library = ctypes.CDLL(str(module))  # ggml loads them all to score them too: scoring runs anywhere
        library.ggml_backend_score.restype = ctypes.c_int
        scored[module.name.removeprefix("libggml-cpu-").removesuffix(".so")] = (module, library.ggml_backend_score())
    return scored


def system_info() -> str:
    """llama.cpp's own line of the instruction sets its loaded CPU backend uses."""
    return llama_cpp_module().llama_print_system_info().decode(errors="replace").strip()


@contextlib.contextmanager
def captured_stderr():
    """Collect what native code writes to file descriptor 2 (llama.cpp's quantizer
    prints there directly); yields a function that returns the text so far."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)

        def text() -> str:
            sink.flush()
            sink.seek(0)
            return sink.read().decode("utf-8", "replace")

        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
