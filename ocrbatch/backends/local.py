"""The local backend: units decoded by this machine's llama.cpp worker pool, from their embeddings."""

from __future__ import annotations

from concurrent.futures import Future

from ..model.language import GenerationRequest, GenerationResult
from .base import Decoded, chained
from .pool import WorkerPool


def decoded(result: GenerationResult, prompts, keep_special_tokens: bool = False) -> Decoded:
    """A llama.cpp result as a :class:`Decoded`; ``keep_special_tokens`` for a spotting page's locations."""
    if result.error:
        return Decoded(error=result.error)
    return Decoded(text=prompts.decode(result.token_ids, keep_special_tokens),
                   n_output_tokens=len(result.token_ids), finish_reason=result.finish_reason,
                   prefill_s=result.prefill_s, decode_s=result.decode_s, token_ids=list(result.token_ids))


class LocalDecoder:
    """Builds each unit's language-model request and runs it on a :class:`WorkerPool`.

    With ``pool=None`` it only builds requests (:meth:`request`): the Ray
    engine's vision actors hand them to its decode actors.
    """

    needs_embeddings = True

    def __init__(self, engine, pool: WorkerPool | None, max_tokens: int, ignore_eos: bool = False):
        self.engine, self.pool = engine, pool
        self.max_tokens, self.ignore_eos = max_tokens, ignore_eos

    def request(self, unit) -> GenerationRequest:
        """The llama.cpp request of an encoded unit, with the unit's loop guard."""
        request = self.engine.request(unit.encoded, unit.prompt, self.max_tokens)
        request.loop_guard = unit.loop_guard
        if self.ignore_eos:  # exactly max_tokens: neither the end of sequence nor the loop guard stops it
            request.stop_ids, request.loop_guard = (), None
        return request

    def submit(self, unit) -> Future:
        keep = unit.spotting
        return chained(self.pool.submit(self.request(unit)), lambda result: decoded(result, self.engine.prompts, keep))

    def cancel(self, future: Future) -> None:
        self.pool.cancel(future.inner)
