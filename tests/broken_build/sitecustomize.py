"""Breaks llama.cpp decoding in every Python process that starts with this folder on PYTHONPATH.

Tests put it there to play a llama.cpp build that cannot run on this machine,
for the real command line and its spawned worker processes alike:
``OCRBATCH_TEST_BROKEN_BUILD=sigill-at-warm-up`` kills a process with SIGILL
where a worker proves its build (``LanguageModel.warm_up``), as an instruction
this CPU lacks would; ``segfault-on-every-page`` leaves the warm-up alone and
crashes each page's prefill with a segmentation fault.

The patch is applied when ``ocrbatch.model.language`` is first imported, not here:
this file runs before ``python -m`` puts the working folder on ``sys.path``, and
importing ocrbatch now could pick up another copy of it.
"""

import os
import sys

_fault = os.environ.get("OCRBATCH_TEST_BROKEN_BUILD")


def _break(language) -> None:
    import ctypes
    import signal

    if _fault == "sigill-at-warm-up":
        def _warm_up(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGILL)

        language.LanguageModel.warm_up = _warm_up
    elif _fault == "segfault-on-every-page":
        def _prefill(self, seq):
            ctypes.string_at(0)

        language.LanguageModel._prefill = _prefill
    else:
        raise ValueError(f"unknown OCRBATCH_TEST_BROKEN_BUILD {_fault!r}")


class _BreakOnImport:
    """A meta-path finder that patches ``ocrbatch.model.language`` as soon as it has loaded."""

    def find_spec(self, name, path=None, target=None):
        if name != "ocrbatch.model.language":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _break(module)

        spec.loader.exec_module = exec_module
        return spec


if _fault:
    sys.meta_path.insert(0, _BreakOnImport())
