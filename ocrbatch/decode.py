"""The decode stage: image embeddings → text, on a pool of llama.cpp worker processes."""

from __future__ import annotations

from concurrent.futures import Future

from .language import GenerationResult
from .pool import RequestTimedOut, WorkerCrashed, WorkerPool
from .vision import EncodedImage

# Failures that belong to one page; anything else the pool raises stops the run.
PAGE_FAILURES = (WorkerCrashed, RequestTimedOut)


class LocalDecoder:
    """Builds each page's language-model request and runs it on a :class:`WorkerPool`."""

    def __init__(self, engine, pool: WorkerPool, text: str, max_tokens: int, ignore_eos: bool = False):
        self.engine, self.pool = engine, pool
        self.text, self.max_tokens, self.ignore_eos = text, max_tokens, ignore_eos

    def submit(self, encoded: EncodedImage) -> Future:
        """Queue one page; the future resolves to a :class:`GenerationResult`."""
        request = self.engine.request(encoded, self.text, self.max_tokens)
        if self.ignore_eos:
            request.stop_ids = ()
        return self.pool.submit(request)

    def cancel(self, future: Future) -> None:
        self.pool.cancel(future)

    def text_of(self, result: GenerationResult) -> str:
        return self.engine.prompts.decode(result.token_ids)

    @property
    def crashes(self) -> int:
        return self.pool.crashes

