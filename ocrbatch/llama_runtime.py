"""Importing llama-cpp-python once, with llama.cpp's log lines kept off the terminal.

llama.cpp logs every model load and quantization in detail; ocrbatch routes
that to Python logging and shows it only when ``OCRBATCH_LLAMA_LOG`` is set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile


def llama_cpp_module():
    """The ``llama_cpp`` module, initialised and quiet."""
    import llama_cpp

    if not getattr(llama_cpp_module, "ready", False):
        level = logging.DEBUG if os.environ.get("OCRBATCH_LLAMA_LOG") else logging.ERROR
        logging.getLogger("llama-cpp-python").setLevel(level)
        llama_cpp.llama_backend_init()
        llama_cpp_module.ready = True
    return llama_cpp


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
