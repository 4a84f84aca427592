"""The decode stage: page → text, by a backend with a small interface.

:class:`LocalDecoder` runs the language model on this machine's worker pool
and needs the page's image embeddings (the encode stage); :class:`RemoteDecoder`
sends the page image to an OpenAI-compatible server and needs no model here.
Both return futures, and turn a finished future into the row's columns with
:meth:`outcome`.
"""

from __future__ import annotations

from concurrent.futures import Future

from ..model.language import GenerationResult
from ..model.repetition import LoopSettings
from ..model.vision import EncodedImage
from .pool import RequestTimedOut, WorkerCrashed, WorkerPool

# Failures that belong to one page; anything else a backend raises stops the run.
PAGE_FAILURES = (WorkerCrashed, RequestTimedOut)


class LocalDecoder:
    """Builds each page's language-model request and runs it on a :class:`WorkerPool`."""

    takes_images = False  # it takes embeddings from the encode stage

    def __init__(self, engine, pool: WorkerPool, max_tokens: int, ignore_eos: bool = False):
        self.engine, self.pool = engine, pool
        self.max_tokens, self.ignore_eos = max_tokens, ignore_eos

    def submit(self, encoded: EncodedImage, prompt: str, loop_guard: LoopSettings | None = None) -> Future:
        """Queue one page or block; the future resolves to a :class:`GenerationResult`."""
        request = self.engine.request(encoded, prompt, self.max_tokens)
        request.loop_guard = loop_guard
        if self.ignore_eos:  # exactly max_tokens: neither the end of sequence nor the loop guard stops it
            request.stop_ids, request.loop_guard = (), None
        return self.pool.submit(request)

    def cancel(self, future: Future) -> None:
        self.pool.cancel(future)

    def outcome(self, result: GenerationResult, keep_special_tokens: bool = False) -> tuple[str | None, dict]:
        """``(error, columns)`` of a finished page; ``keep_special_tokens`` for a spotting page's locations."""
        if result.error:
            return result.error, {}
        text = self.engine.prompts.decode(result.token_ids, keep_special_tokens)
        return None, {"text": text, "n_output_tokens": len(result.token_ids),
                      "finish_reason": result.finish_reason, "prefill_s": result.prefill_s,
                      "decode_s": result.decode_s}

    @property
    def crashes(self) -> int:
        return self.pool.crashes


class RemoteDecoder:
    """Sends page images to an OpenAI-compatible server through a :class:`~ocrbatch.backends.remote.RemoteRecognizer`."""

    takes_images = True

    def __init__(self, recognizer, max_tokens: int, ignore_eos: bool = False):
        self.recognizer = recognizer
        self.max_tokens, self.ignore_eos = max_tokens, ignore_eos

    def submit(self, image, prompt: str, pixel_bounds: tuple[int, int] | None = None,
               keep_special_tokens: bool = False) -> Future:
        """Queue one page or block image (blocks while the recognizer's queue is full: backpressure).

        ``pixel_bounds`` are the image's resize bounds (None: a whole page's,
        the model's own). Loop guards are the server's business: none is
        sent. ``keep_special_tokens`` asks the server for the answer with its
        special tokens (a spotting page's locations), since here it arrives as text.
        """
        return self.recognizer.submit(image, prompt, self.max_tokens, pixel_bounds, self.ignore_eos,
                                      keep_special_tokens)

    def cancel(self, future: Future) -> None:
        future.cancel()  # a request already sent finishes on the server; its answer is dropped

    @staticmethod
    def outcome(result, keep_special_tokens: bool = False) -> tuple[str | None, dict]:
        """``(error, columns)`` of a finished page; token counts are the server's ``usage``, if any.

        The answer is text already: special tokens are in it when :meth:`submit` asked for them.
        """
        if result.error:
            return result.error, {}
        return None, {"text": result.text, "n_output_tokens": result.n_output_tokens,
                      "n_image_tokens": result.n_image_tokens, "finish_reason": result.finish_reason,
                      "decode_s": result.elapsed_s}

    crashes = 0
