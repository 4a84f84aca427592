"""Breaks llama.cpp decoding in every Python process that starts with this folder on PYTHONPATH.

Tests put it there to play a llama.cpp build that cannot run on this machine,
for the real command line and its spawned worker processes alike:
``OCRBATCH_TEST_BROKEN_BUILD=sigill-at-warm-up`` kills a process with SIGILL
where a worker proves its build (``LanguageModel.warm_up``), as an instruction
this CPU lacks would; ``segfault-on-every-page`` leaves the warm-up alone and
crashes each page's prefill with a segmentation fault.
"""

import os

_fault = os.environ.get("OCRBATCH_TEST_BROKEN_BUILD")
if _fault:
    import ctypes
    import signal

    from ocrbatch import language

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
