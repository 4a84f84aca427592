"""The language stage: ERNIE-4.5 as a GGUF in llama.cpp, fed image embeddings.

Uses llama-cpp-python's low-level API. Each sequence is prefilled span by span
in ``llama_decode`` calls — text before the image, the image embeddings
(``llama_batch.embd`` with four M-RoPE positions per embedding, laid out
section-major), text after it; with several images, one embedding call each,
text between them — and then all active sequences advance
one token per call together. The context holds up to ``n_seq_max``
sequences in one unified KV cache, so a worker decodes several pages at once
and starts a new page as soon as another finishes.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..errors import ModelError, OcrbatchError
from ..machine.llama_runtime import llama_cpp_module
from .gguf import inspect_gguf
from .prompt import ImagePrompt
from .repetition import LoopSettings, RepetitionGuard

_GGML_TYPE_F32 = 0
_GGML_TYPE_F16 = 1
_FLASH_ATTN_DISABLED = 0


@dataclass(frozen=True)
class Sampling:
    """Decoding settings: greedy when ``temperature`` is 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class GenerationRequest:
    """One prompt to complete: token layout, image embeddings and limits."""

    prompt: ImagePrompt
    embeddings: np.ndarray  # (n_image_tokens, n_embd) float32: every image's rows, in prompt order
    max_tokens: int
    stop_ids: tuple[int, ...] = ()
    sampling: Sampling = Sampling()
    on_token: Callable[[int], None] | None = None  # called with each new token id, for streaming
    loop_guard: LoopSettings | None = None  # cut a decoding loop (finish reason "repetition"); None: never


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "stop", "length", "repetition", "cancelled" or "error"
    n_prompt_tokens: int
    prefill_s: float
    decode_s: float
    error: str | None = None


@dataclass
class _Sequence:
    index: object  # the caller's key for the request
    request: GenerationRequest
    seq_id: int
    position: int
    rng: np.random.Generator
    tokens: list[int] = field(default_factory=list)
    guard: RepetitionGuard | None = None
    prefill_s: float = 0.0
    decode_started: float = 0.0


class _Batch:
    """A ``llama_batch`` built from numpy arrays that stay alive while it is used."""

    def __init__(self, llama_cpp, n_tokens: int, seq_ids: np.ndarray, positions: np.ndarray,
                 tokens: np.ndarray | None = None, embd: np.ndarray | None = None,
                 outputs: np.ndarray | None = None):
        self._keep = []
        batch = llama_cpp.llama_batch()
        batch.n_tokens = n_tokens
        if tokens is not None:
            batch.token = self._pointer(np.ascontiguousarray(tokens, dtype=np.int32), ctypes.c_int32)
        if embd is not None:
            batch.embd = self._pointer(np.ascontiguousarray(embd, dtype=np.float32), ctypes.c_float)
        batch.pos = self._pointer(np.ascontiguousarray(positions, dtype=np.int32), ctypes.c_int32)
        batch.n_seq_id = self._pointer(np.ones(n_tokens, dtype=np.int32), ctypes.c_int32)
        seq = np.ascontiguousarray(seq_ids, dtype=np.int32)
        self._keep.append(seq)
        pointer_type = ctypes.POINTER(ctypes.c_int32)
        seq_pointers = (pointer_type * n_tokens)(
            *[ctypes.cast(seq.ctypes.data + 4 * i, pointer_type) for i in range(n_tokens)]
        )
        self._keep.append(seq_pointers)
        batch.seq_id = seq_pointers
        outputs = np.zeros(n_tokens, dtype=np.int8) if outputs is None else outputs.astype(np.int8)
        batch.logits = self._pointer(outputs, ctypes.c_int8)
        self.batch = batch

    def _pointer(self, array: np.ndarray, ctype):
        self._keep.append(array)
        return array.ctypes.data_as(ctypes.POINTER(ctype))


class LanguageModel:
    """A llama.cpp context over a PaddleOCR-VL language-model GGUF."""

    def __init__(self, gguf_path: str | Path, n_ctx: int = 8192, n_seq_max: int = 1,
                 n_threads: int | None = None, n_batch: int = 2048, exact: bool | None = None):
        """Load ``gguf_path`` and create a context for ``n_seq_max`` parallel sequences.

        ``exact`` keeps the KV cache in F32 and plain attention so an F32 GGUF
        reproduces transformers' F32 arithmetic; by default it follows the file type.
        """
        llama_cpp = llama_cpp_module()
        self.info = inspect_gguf(gguf_path)
        self.path = Path(gguf_path)
        self.n_seq_max = n_seq_max
        self.n_batch = n_batch
        exact = self.info.quant == "F32" if exact is None else exact

        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self._model:
            raise ModelError(f"{self.path}: llama.cpp could not load the model")

        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = n_batch
        ctx_params.n_ubatch = min(512, n_batch)
        ctx_params.n_seq_max = n_seq_max
        ctx_params.kv_unified = True
        threads = n_threads or os.cpu_count() or 1
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        ctx_params.no_perf = True
        if exact:
            ctx_params.type_k = _GGML_TYPE_F32
            ctx_params.type_v = _GGML_TYPE_F32
            ctx_params.flash_attn_type = _FLASH_ATTN_DISABLED
        self._ctx = llama_cpp.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            self._model = None
            raise ModelError(f"{self.path}: llama.cpp could not create a context (n_ctx={n_ctx})")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self.n_embd = llama_cpp.llama_model_n_embd_inp(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        self._llama_cpp = llama_cpp

    def close(self) -> None:
        llama_cpp = self._llama_cpp
        if getattr(self, "_ctx", None):
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        if hasattr(self, "_llama_cpp"):
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- low level -------------------------------------------------------------------

    def _decode(self, batch: _Batch) -> None:
        status = self._llama_cpp.llama_decode(self._ctx, batch.batch)
        if status != 0:
            raise OcrbatchError(f"llama_decode failed with status {status}")

    def _logits(self, index: int) -> np.ndarray:
        pointer = self._llama_cpp.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def _decode_tokens(self, seq_id: int, tokens: Iterable[int], positions: np.ndarray, want_logits: bool) -> None:
        tokens = np.asarray(list(tokens), dtype=np.int32)
        for start in range(0, len(tokens), self.n_batch):
            chunk = slice(start, start + self.n_batch)
            n = len(tokens[chunk])
            outputs = np.zeros(n, dtype=np.int8)
            if want_logits and start + n == len(tokens):
                outputs[-1] = 1
            self._decode(_Batch(self._llama_cpp, n, np.full(n, seq_id), positions[chunk],
                                tokens=tokens[chunk], outputs=outputs))

    def _decode_embeddings(self, seq_id: int, embeddings: np.ndarray, positions: np.ndarray) -> None:
        for start in range(0, len(embeddings), self.n_batch):
            chunk = embeddings[start:start + self.n_batch]
            n = len(chunk)
            section_major = np.ascontiguousarray(positions[:, start:start + n]).reshape(-1)
            self._decode(_Batch(self._llama_cpp, n, np.full(n, seq_id), section_major, embd=chunk))

    def _check(self, request: GenerationRequest) -> str | None:
        prompt = request.prompt
        if request.embeddings.shape != (prompt.n_image_tokens, self.n_embd):
            return (f"image embeddings have shape {tuple(request.embeddings.shape)}, "
                    f"expected ({prompt.n_image_tokens}, {self.n_embd})")
        if self._budget(request) > self.n_ctx:
            return (f"prompt of {prompt.n_prompt_tokens} tokens plus max_tokens {request.max_tokens} "
                    f"does not fit the context of {self.n_ctx} tokens")
        return None

    @staticmethod
    def _budget(request: GenerationRequest) -> int:
        """KV-cache cells a request may use."""
        return request.prompt.n_prompt_tokens + request.max_tokens

    def _prefill(self, seq: _Sequence) -> np.ndarray:
        prompt = seq.request.prompt
        started = time.perf_counter()
        embeddings = seq.request.embeddings.astype(np.float32, copy=False)
        spans = prompt.spans()
        used = 0
        for index, (token_ids, positions) in enumerate(spans):
            if token_ids is None:
                self._decode_embeddings(seq.seq_id, embeddings[used:used + positions.shape[1]], positions)
                used += positions.shape[1]
            elif token_ids:
                self._decode_tokens(seq.seq_id, token_ids, positions, want_logits=index == len(spans) - 1)
        seq.prefill_s = time.perf_counter() - started
        seq.position = prompt.first_generated_position
        seq.decode_started = time.perf_counter()
        return self._logits(-1)

    @staticmethod
    def _choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
        if sampling.temperature <= 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / sampling.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if sampling.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, sampling.top_p) + 1)]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(rng.choice(len(probs), p=probs))

    # -- generation ------------------------------------------------------------------

    def scheduler(self) -> "Scheduler":
        """A scheduler that admits requests between decode steps (continuous batching)."""
        return Scheduler(self)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Complete every request, up to ``n_seq_max`` of them decoding at once.

        A request that cannot run (wrong embedding shape, too long for the
        context) gets a result with ``error`` set; the others are unaffected.
        """
        scheduler = self.scheduler()
        for index, request in enumerate(requests):
            scheduler.submit(index, request)
        results: list[GenerationResult | None] = [None] * len(requests)
        while scheduler.busy:
            for index, result in scheduler.step():
                results[index] = result
        return results

    def score(self, request: GenerationRequest, forced: list[int]) -> list[int]:
        """Teacher forcing: the argmax after the prompt and after each forced token.

        Used to measure how often a quantized model agrees with F32 token by token.
        """
        self._llama_cpp.llama_memory_clear(self._memory, True)
        seq = _Sequence(0, request, 0, 0, np.random.default_rng(0))
        choices = [int(np.argmax(self._prefill(seq)))]
        for token in forced[:-1]:
            self._decode(_Batch(self._llama_cpp, 1, np.array([0]), np.array([seq.position]),
                                tokens=np.array([token]), outputs=np.ones(1, dtype=np.int8)))
            seq.position += 1
            choices.append(int(np.argmax(self._logits(0))))
        self._llama_cpp.llama_memory_clear(self._memory, True)
        return choices

    def warm_up(self, prompt_tokens: int = 64, steps: int = 4) -> list[int]:
        """Decode a short text prompt and a few greedy steps; returns the tokens chosen.

        It runs the kernels a page uses at this GGUF's quant: a batched prefill
        (matrix-matrix, repacked weights) and single-token steps (matrix-vector).
        A llama.cpp build that this CPU cannot run dies here (SIGILL) rather than
        on a page. The ids are arbitrary: only the arithmetic matters.
        """
        self._llama_cpp.llama_memory_clear(self._memory, True)
        prompt = np.arange(prompt_tokens, dtype=np.int32) % self.n_vocab
        self._decode_tokens(0, prompt, np.arange(prompt_tokens, dtype=np.int32), want_logits=True)
        chosen = []
        for position in range(prompt_tokens, prompt_tokens + steps):
            logits = self._logits(-1 if not chosen else 0)
            if not np.isfinite(logits).all():
                raise ModelError(f"{self.path}: llama.cpp computed non-finite logits in its warm-up")
            chosen.append(int(np.argmax(logits)))
            self._decode(_Batch(self._llama_cpp, 1, np.array([0]), np.array([position]),
                                tokens=np.array([chosen[-1]]), outputs=np.ones(1, dtype=np.int8)))
        self._llama_cpp.llama_memory_clear(self._memory, True)
        return chosen


class Scheduler:
    """Runs many requests through one :class:`LanguageModel`, admitting new ones as others finish.

    ``submit`` queues a request under a key; each ``step`` prefills what fits
    into free sequence slots and KV cells, advances every active sequence by
    one token in a single ``llama_decode``, and returns ``(key, result)`` for
    the requests that finished.
    """

    def __init__(self, model: LanguageModel):
        self.model = model
        self.pending: deque[tuple[object, GenerationRequest]] = deque()
        self.active: list[_Sequence] = []
        self.free_seq_ids = list(range(model.n_seq_max - 1, -1, -1))
        self._finished: list[tuple[object, GenerationResult]] = []
        model._llama_cpp.llama_memory_clear(model._memory, True)

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.active or self._finished)

    def submit(self, key, request: GenerationRequest) -> None:
        self.pending.append((key, request))

    def cancel(self, key) -> bool:
        """Drop a request, queued or running; it finishes with reason ``cancelled``."""
        for index, (pending_key, request) in enumerate(self.pending):
            if pending_key == key:
                del self.pending[index]
                self._finished.append((key, GenerationResult([], "cancelled", request.prompt.n_prompt_tokens,
                                                              0.0, 0.0)))
                return True
        for seq in self.active:
            if seq.index == key:
                self._finish(seq, "cancelled")
                return True
        return False

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        model = self.model
        model._llama_cpp.llama_memory_seq_rm(model._memory, seq.seq_id, -1, -1)
        self.free_seq_ids.append(seq.seq_id)
        self.active.remove(seq)
        decode_s = time.perf_counter() - seq.decode_started if seq.decode_started else 0.0
        self._finished.append((seq.index, GenerationResult(
            token_ids=seq.tokens, finish_reason=reason, n_prompt_tokens=seq.request.prompt.n_prompt_tokens,
            prefill_s=seq.prefill_s, decode_s=decode_s, error=error)))

    def _accept(self, seq: _Sequence, token: int) -> None:
        if token in seq.request.stop_ids:
            self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        if seq.request.on_token is not None:
            seq.request.on_token(token)
        keep = seq.guard.push(token) if seq.guard is not None else None
        if keep is not None:
            del seq.tokens[keep:]  # the text before the loop and one turn of it
            self._finish(seq, "repetition")
        elif len(seq.tokens) >= seq.request.max_tokens:
            self._finish(seq, "length")

    def _admit(self) -> None:
        model = self.model
        while self.pending and self.free_seq_ids:
            key, request = self.pending[0]
            problem = model._check(request)
            if problem is not None:
                self.pending.popleft()
                self._finished.append((key, GenerationResult(
                    [], "error", request.prompt.n_prompt_tokens, 0.0, 0.0, problem)))
                continue
            in_use = sum(model._budget(seq.request) for seq in self.active)
            if self.active and in_use + model._budget(request) > model.n_ctx:
                break  # wait until a running sequence frees its cells
            self.pending.popleft()
            seq = _Sequence(key, request, self.free_seq_ids.pop(), 0, np.random.default_rng(request.sampling.seed))
            if request.loop_guard is not None:
                seq.guard = RepetitionGuard(request.loop_guard)
            self.active.append(seq)
            if request.max_tokens <= 0:
                self._finish(seq, "length")
                continue
            try:
                logits = model._prefill(seq)
            except OcrbatchError as exc:  # this request alone fails; the others go on
                self._finish(seq, "error", f"prefill failed: {exc}")
                continue
            self._accept(seq, model._choose(logits, request.sampling, seq.rng))

    def step(self) -> list[tuple[object, GenerationResult]]:
        """Admit, advance all active sequences by one token, return what finished."""
        model = self.model
        self._admit()
        if self.active:
            stepping = list(self.active)
            try:
                self._advance(stepping)
                for i, seq in enumerate(stepping):
                    self._accept(seq, model._choose(model._logits(i), seq.request.sampling, seq.rng))
            except OcrbatchError:
                # One sequence can make the joint step fail (its cells, its values): step each
                # alone so only the ones that fail by themselves end, with the reason.
                for seq in stepping:
                    try:
                        self._advance([seq])
                    except OcrbatchError as exc:
                        self._finish(seq, "error", f"decoding failed at token {len(seq.tokens)}: {exc}")
                        continue
                    self._accept(seq, model._choose(model._logits(0), seq.request.sampling, seq.rng))
        finished, self._finished = self._finished, []
        return finished

    def _advance(self, stepping: list[_Sequence]) -> None:
        """Feed each sequence's last token in one ``llama_decode``; logits come out in this order."""
        model = self.model
        tokens = np.array([seq.tokens[-1] for seq in stepping], dtype=np.int32)
        positions = np.array([seq.position for seq in stepping], dtype=np.int32)
        model._decode(_Batch(model._llama_cpp, len(stepping), np.array([s.seq_id for s in stepping]),
                             positions, tokens=tokens, outputs=np.ones(len(stepping), dtype=np.int8)))
        for seq in stepping:
            seq.position += 1


class DecodeThread:
    """One :class:`LanguageModel` shared by many threads: each submits requests, one thread decodes them all.

    A request submitted while others decode joins them between two steps
    (the scheduler's continuous batching), so callers that each bring one
    page keep the model's sequences as full as one caller with many pages.
    A fault the scheduler cannot pin on one request reruns each request it
    held alone, so that only the culprit fails.
    """

    def __init__(self, model: LanguageModel):
        self.model = model
        self._submitted: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="llama.cpp decoding", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> Future:
        """The request's future: its :class:`GenerationResult`, or its error in the result's ``error``."""
        future: Future = Future()
        self._submitted.put((future, request))
        return future

    def close(self) -> None:
        """Finish what was submitted, then stop the thread."""
        self._submitted.put(None)
        self._thread.join()

    def _run(self) -> None:
        scheduler, held, closing = self.model.scheduler(), {}, False
        while not (closing and not scheduler.busy):
            try:
                # Block only when there is nothing to decode.
                while not closing and (item := self._submitted.get(block=not scheduler.busy)) is not None:
                    future, request = item
                    held[future] = request
                    scheduler.submit(future, request)
                closing = True
            except queue.Empty:
                pass
            try:
                finished = scheduler.step()
            except Exception:
                finished = [(future, self._alone(request)) for future, request in held.items()]
                scheduler = self.model.scheduler()  # clears the context's memory
            for future, result in finished:
                del held[future]
                future.set_result(result)

    def _alone(self, request: GenerationRequest) -> GenerationResult:
        try:
            [result] = self.model.generate([request])
        except Exception as exc:
            result = GenerationResult([], "error", request.prompt.n_prompt_tokens, 0.0, 0.0,
                                      f"language model failed ({type(exc).__name__}: {exc})")
        return result
