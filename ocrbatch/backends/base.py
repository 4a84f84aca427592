"""One interface for every backend: a unit of a page in, a future of what the model made of it out.

A :class:`Decoder` takes a :class:`~ocrbatch.job.units.Unit` (an image, or its
embeddings, with its prompt, pixel bounds and loop guard) and returns a
future that resolves to one :class:`Decoded`, whichever backend ran it:
:class:`~ocrbatch.backends.local.LocalDecoder` (this machine's llama.cpp
worker pool, fed the encode stage's embeddings) or
:class:`~ocrbatch.backends.remote.RemoteDecoder` (an OpenAI-compatible server,
sent the unit's image). A failure of the unit (llama.cpp refused it, the server
answered an error) is a :class:`Decoded` with ``error``; the exceptions in
:data:`PAGE_FAILURES` also fail the unit's page; any other exception is the
backend's own failure and stops the run.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from .pool import RequestTimedOut, WorkerCrashed

# Failures that belong to one page; anything else a backend raises stops the run.
PAGE_FAILURES = (WorkerCrashed, RequestTimedOut)


@dataclass
class Decoded:
    """What a backend made of one unit: its text and figures, or why there is none."""

    error: str | None = None
    text: str = ""
    n_output_tokens: int | None = None  # None: a server that gives no usage
    finish_reason: str | None = None
    prefill_s: float | None = None  # None where the backend does not say (a remote server)
    decode_s: float | None = None
    n_image_tokens: int | None = None  # counted by the backend itself (a remote server); None: counted here
    token_ids: list[int] = field(default_factory=list)  # where the backend has them (llama.cpp here)

    def columns(self) -> dict:
        """The unit's columns of its page's row."""
        return {"text": self.text, "n_output_tokens": self.n_output_tokens, "finish_reason": self.finish_reason,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s}


class Decoder(Protocol):
    """A backend that decodes units: the worker pool here, or a remote server."""

    # Whether units reach it as embeddings from this machine's vision encoder (the encode stage)
    # rather than as images.
    needs_embeddings: bool

    def submit(self, unit) -> Future:
        """Queue one unit (may block while the backend is full: backpressure); resolves to a :class:`Decoded`."""
        ...

    def cancel(self, future: Future) -> None:
        """Stop a submitted unit: it resolves cancelled, or with ``finish_reason`` ``cancelled``."""
        ...


def chained(inner: Future, convert) -> Future:
    """A future resolving to ``convert(inner's result)``; cancelling either cancels the other.

    ``inner`` stays reachable as the returned future's ``inner``, for a backend
    that cancels through its own queue.
    """
    outer: Future = Future()
    outer.inner = inner

    def done(_):
        if outer.done():  # the caller cancelled it first
            return
        if inner.cancelled():
            outer.cancel()
            return
        error = inner.exception()
        if error is not None:
            outer.set_exception(error)
            return
        try:
            outer.set_result(convert(inner.result()))
        except Exception as exc:  # a conversion bug reaches the caller rather than vanishing in a callback
            outer.set_exception(exc)

    inner.add_done_callback(done)
    return outer
