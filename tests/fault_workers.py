"""Processes that misbehave on purpose: llama.cpp workers and a renderer, for the reliability tests.

They run in spawned children, which import this module by name (the tests folder is on
sys.path there too). The page to misbehave on is the one whose image has
$OCRBATCH_TEST_POISON_TOKENS image tokens: a page size no other test page has.
"""

from __future__ import annotations


def _is_poison(message) -> bool:
    import os

    wanted = os.environ.get("OCRBATCH_TEST_POISON_TOKENS")
    request = message[1] if isinstance(message, tuple) and len(message) == 3 else None
    return bool(wanted) and request is not None and request.prompt.n_image_tokens == int(wanted)


class _Tripwire:
    """A worker's pipe that calls ``action`` when the poison request arrives."""

    def __init__(self, conn, action):
        self.conn, self.action = conn, action

    def recv(self):
        message = self.conn.recv()
        if _is_poison(message):
            self.action()
        return message

    def __getattr__(self, name):
        return getattr(self.conn, name)


def crashing_worker_main(conn, settings) -> None:
    """A llama.cpp worker that dies of a segmentation fault whenever it receives the poison page."""
    import ctypes

    from ocrbatch.backends.pool import _worker_main

    _worker_main(_Tripwire(conn, lambda: ctypes.string_at(0)), settings)


def segfault_on_every_request_worker_main(conn, settings) -> None:
    """A llama.cpp worker that passes its warm-up, then dies of a segmentation fault on every request
    it receives: a build that miscompiles a kernel only pages use."""
    import ctypes

    from ocrbatch.backends.pool import _worker_main

    class _OnEveryRequest(_Tripwire):
        def recv(self):
            message = self.conn.recv()
            if isinstance(message, tuple) and len(message) == 3:
                self.action()
            return message

    _worker_main(_OnEveryRequest(conn, lambda: ctypes.string_at(0)), settings)


def hanging_worker_main(conn, settings) -> None:
    """A llama.cpp worker that hangs (never reads its pipe again) on the poison page."""
    import time

    from ocrbatch.backends.pool import _worker_main

    _worker_main(_Tripwire(conn, lambda: time.sleep(3600)), settings)


def failing_prefill_worker_main(conn, settings) -> None:
    """A llama.cpp worker whose llama_decode fails for the poison page's prefill only."""
    import os

    from ocrbatch.backends.pool import _worker_main
    from ocrbatch.errors import OcrbatchError
    from ocrbatch.model.language import LanguageModel

    wanted = int(os.environ["OCRBATCH_TEST_POISON_TOKENS"])
    prefill = LanguageModel._prefill

    def failing(self, seq):
        if seq.request.prompt.n_image_tokens == wanted:
            raise OcrbatchError("llama_decode failed with status 1")
        return prefill(self, seq)

    LanguageModel._prefill = failing
    _worker_main(conn, settings)


def segfaulting_renderer(document, pages, dpi, max_pixels):
    """Renders pages as usual, but crashes the render process on files named *segfault*."""
    import ctypes

    from ocrbatch.sources.rasterize import iter_pages

    if "segfault" in document.path.name:
        ctypes.string_at(0)
    return iter_pages(document, pages, dpi, max_pixels)
