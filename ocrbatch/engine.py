"""The split engine: vision in PyTorch, language model in llama.cpp.

>>> engine = Engine(model="PaddlePaddle/PaddleOCR-VL", quant="Q4_K_M")
>>> [result] = engine.ocr(["page.png"], task="ocr")
>>> result.text
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ModelError, OcrbatchError
from .layout.blocks import BLOCK_MAX_PIXELS
from .layout.spotting import SPOTTING_PIXEL_BOUNDS, prepare, read_spots, spotted_text
from .model.gguf import convert, inspect_gguf
from .model.language import GenerationRequest, LanguageModel, Sampling
from .model.prompt import TASK_PROMPTS, PromptBuilder
from .model.vision import EncodedImage, VisionEncoder
from .model.weights import ModelWeights
from .sources.images import open_image

DEFAULT_MAX_TOKENS = 1024
# Room for the chat template's text around the image.
PROMPT_TEXT_ALLOWANCE = 128


@dataclass
class OcrResult:
    """What the engine made of one image."""

    path: str | None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    n_image_tokens: int = 0
    n_prompt_tokens: int = 0
    finish_reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    blocks: list[dict] = field(default_factory=list)  # layout mode: each block with its text
    spots: list[dict] = field(default_factory=list)  # task spotting: each piece of text with its quad

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return asdict(self)


def context_size(image_processor, merge_size: int, n_seq_max: int, max_tokens: int) -> int:
    """KV cells for ``n_seq_max`` sequences of the largest image plus ``max_tokens``.

    The largest image is the largest of a whole page (the processor's own
    maximum), a layout block and a spotting page, whose bounds are the
    pipeline's and may lie above the processor's (1.5's spotting pages
    reach 1,605,632 pixels where its processor stops at 1,003,520). A
    function of the processor alone, so that a process holding only the
    language model (a Ray decode actor) sizes its context as :class:`Engine` does.
    """
    largest = max(image_processor.size.longest_edge, BLOCK_MAX_PIXELS, SPOTTING_PIXEL_BOUNDS[1])
    max_image_tokens = largest // (image_processor.patch_size * merge_size) ** 2
    return n_seq_max * (max_image_tokens + PROMPT_TEXT_ALLOWANCE + max_tokens)


class Engine:
    """PaddleOCR-VL split in two: :class:`VisionEncoder` → :class:`LanguageModel`."""

    def __init__(
        self,
        model: str | Path,
        quant: str = "Q4_K_M",
        gguf: str | Path | None = None,
        vision_dtype: str = "float32",
        device: str = "cpu",
        max_tokens: int = DEFAULT_MAX_TOKENS,
        n_seq_max: int = 1,
        n_ctx: int | None = None,
        threads: int | None = None,
        cache_dir: str | Path | None = None,
        with_language: bool = True,
        layout: str = "none",
        layout_model: str | None = None,
        stitch: bool = True,
        charts: bool = False,
        seals: bool = False,
    ):
        """Load ``model`` (model folder or Hub id) and its language model as a GGUF.

        ``gguf`` uses an existing language-model GGUF (an official build, say)
        instead of converting the model; it is re-quantized only if
        ``quant`` differs from its type. ``with_language=False`` skips loading
        the language model here, for callers that decode in a :class:`WorkerPool`.
        ``layout`` (``cdla``, ``pp-doclayout`` with ``layout_model``, or ``none``)
        makes :meth:`ocr` recognise each layout block with its own prompt and
        return the page's Markdown; ``stitch`` lets pieces of text share one
        image, as in the batch job (:mod:`ocrbatch.layout.stitch`). ``pp-doclayout`` without
        ``layout_model`` is PP-DocLayoutV2 for a 1.0 model, V3 for 1.5+.
        ``charts`` and ``seals`` send those blocks to the model instead of
        keeping them as pictures (seals need a 1.5+ model).
        """
        # torch's thread count is the process's: the engine sets it for its vision encoder and close() puts
        # it back, so an application's own torch work does not keep the engine's setting.
        self._torch_threads = None
        if threads:
            import torch

            self._torch_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
        self.weights = ModelWeights.open(model)
        self.model_name = str(model)
        self.max_tokens = max_tokens
        self.gguf_path = convert(gguf or self.weights.path, quant, cache=cache_dir)
        self.vision = VisionEncoder(self.weights, dtype=vision_dtype, device=device, cache=cache_dir)
        config = self.weights.config
        self.prompts = PromptBuilder(self.weights.path, config.image_token_id, self.vision.merge_size)
        self.stop_ids = tuple(self.weights.eos_token_ids)
        info = inspect_gguf(self.gguf_path)
        self.quant = info.quant or quant
        if info.n_embd != config.text_config.hidden_size:
            raise ModelError(
                f"{self.gguf_path}: language model width {info.n_embd} does not match "
                f"the model's {config.text_config.hidden_size}"
            )
        from .layout.blocks import recognised_pictures
        from .layout.detect import load_layout

        if seals:
            self.prompts.task_text("seal")  # a 1.0 model was not trained for it
        self.layout = load_layout(layout, layout_model, device=device, threads=threads,
                                  later_release=self.prompts.supports_later_tasks,
                                  recognised=recognised_pictures(charts, seals))
        self.stitch = stitch
        self.language = None
        if with_language:
            self.language = LanguageModel(self.gguf_path, n_ctx=n_ctx or self.context_size(n_seq_max),
                                          n_seq_max=n_seq_max, n_threads=threads)

    def context_size(self, n_seq_max: int, max_tokens: int | None = None) -> int:
        """KV cells for ``n_seq_max`` sequences of the largest image plus ``max_tokens``."""
        return context_size(self.vision.image_processor, self.vision.merge_size, n_seq_max,
                            max_tokens or self.max_tokens)

    def request(self, images: EncodedImage | Sequence[EncodedImage], text: str, max_tokens: int | None = None,
                sampling: Sampling = Sampling(), on_token=None) -> GenerationRequest:
        """The language-model request for one encoded image, or several in one prompt, and prompt text."""
        images = [images] if isinstance(images, EncodedImage) else list(images)
        return GenerationRequest(
            prompt=self.prompts.build(text, *(image.grid_thw for image in images)),
            embeddings=np.concatenate([image.embeddings for image in images]),
            max_tokens=self.max_tokens if max_tokens is None else max_tokens,
            stop_ids=self.stop_ids,
            sampling=sampling,
            on_token=on_token,
        )

    def prompt_text(self, task: str = "ocr", prompt: str | None = None) -> str:
        """The user text for a task, or a free-form ``prompt`` instead."""
        return prompt if prompt is not None else self.prompts.task_text(task)

    def generate(
        self,
        encoded: Sequence[EncodedImage | Sequence[EncodedImage]],
        texts: Sequence[str],
        max_tokens: int | None = None,
        sampling: Sampling = Sampling(),
        on_token=None,
    ) -> list[OcrResult]:
        """Run the language model on already-encoded images (or lists of images, several in one
        prompt), one prompt text each."""
        requests = [self.request(image, text, max_tokens, sampling, on_token) for image, text in zip(encoded, texts)]
        results = []
        for request, generated in zip(requests, self.language.generate(requests)):
            result = OcrResult(
                path=None,
                token_ids=generated.token_ids,
                text=self.prompts.decode(generated.token_ids),
                n_image_tokens=request.prompt.n_image_tokens,
                n_prompt_tokens=generated.n_prompt_tokens,
                finish_reason=generated.finish_reason,
                timings={"prefill_s": generated.prefill_s, "decode_s": generated.decode_s},
                error=generated.error,
            )
            results.append(result)
        return results

    def ocr(
        self,
        images: Sequence,
        task: str = "ocr",
        prompt: str | None = None,
        max_tokens: int | None = None,
        sampling: Sampling = Sampling(),
    ) -> list[OcrResult]:
        """OCR a list of images (paths, bytes or PIL images), all in one vision batch.

        An image that cannot be read gets a result with ``error`` set; the
        others are processed as usual. With ``Spotting:`` (task ``spotting``)
        each image is prepared and encoded as :mod:`ocrbatch.layout.spotting` says, and the
        result's ``text`` and ``spots`` are what the output's locations read.
        """
        text = self.prompt_text(task, prompt)
        results: list[OcrResult] = []
        loaded = []
        for item in images:
            path = str(item) if isinstance(item, (str, Path)) else None
            result = OcrResult(path=path)
            results.append(result)
            try:
                loaded.append((result, item if hasattr(item, "convert") else open_image(item)))
            except OcrbatchError as exc:
                result.error = str(exc)
        if not loaded:
            return results
        if self.layout is not None:
            for result, image in loaded:
                self._ocr_blocks(result, image, max_tokens, sampling)
            return results
        spotting = text == TASK_PROMPTS["spotting"]
        started = time.perf_counter()
        if spotting:
            encoded = self.vision.encode([prepare(image) for _, image in loaded], SPOTTING_PIXEL_BOUNDS)
        else:
            encoded = self.vision.encode([image for _, image in loaded])
        vision_s = (time.perf_counter() - started) / len(loaded)
        generated = self.generate(encoded, [text] * len(loaded), max_tokens=max_tokens, sampling=sampling)
        for (result, image), output in zip(loaded, generated):
            path = result.path
            result.__dict__.update(output.__dict__)
            result.path = path
            result.timings = {"vision_s": vision_s, **output.timings}
            if spotting:
                spots = read_spots(self.prompts.decode(output.token_ids, keep_special_tokens=True), *image.size)
                result.text, result.spots = spotted_text(spots), [spot.to_dict() for spot in spots]
        return results

    def ocr_together(
        self,
        images: Sequence,
        task: str = "ocr",
        prompt: str | None = None,
        max_tokens: int | None = None,
        sampling: Sampling = Sampling(),
    ) -> OcrResult:
        """One answer about several whole images in one prompt (the pages of a document, a page and
        its crop), as transformers answers a message with several images: each image encoded at its
        own size and placed with its own positions, in order. Layout and spotting are per image
        (:meth:`ocr`). An image that cannot be read fails the result, naming it.
        """
        text = self.prompt_text(task, prompt)
        result = OcrResult(path=None)
        try:
            loaded = [item if hasattr(item, "convert") else open_image(item) for item in images]
        except OcrbatchError as exc:
            result.error = str(exc)
            return result
        started = time.perf_counter()
        encoded = self.vision.encode(loaded)
        vision_s = time.perf_counter() - started
        [output] = self.generate([encoded], [text], max_tokens=max_tokens, sampling=sampling)
        result.__dict__.update(output.__dict__)
        result.timings = {"vision_s": vision_s, **output.timings}
        return result

    def _ocr_blocks(self, result: OcrResult, image, max_tokens: int | None, sampling: Sampling) -> None:
        """Layout mode: the batch job's page flow on one image, decoded by this engine's language model."""
        from .backends.local import decoded
        from .job.flow import FinishedPage, PageFlow
        from .sources.discover import Document
        from .sources.rasterize import PageImage

        started = time.perf_counter()
        page = PageImage(Document(Path(result.path or "image"), ""), 1, 1, image=image)
        page.blocks = self.layout.detect(image)
        page.layout_s = time.perf_counter() - started
        flow = PageFlow("ocr", TASK_PROMPTS["ocr"], self.model_name, self.quant, stitch=self.stitch)
        finished = flow.start(page)
        token_ids = []
        if not isinstance(finished, FinishedPage):
            ready = list(flow.encode(self.vision, [finished], max_batch_patches=sys.maxsize))
            units = [item for item in ready if not isinstance(item, FinishedPage)]
            finished = next((item for item in ready if isinstance(item, FinishedPage)), None)
            requests = []
            for _, unit in units:
                requests.append(self.request(unit.encoded, unit.prompt, max_tokens, sampling))
                requests[-1].loop_guard = unit.loop_guard
            for (work, unit), generated in zip(units, self.language.generate(requests) if requests else []):
                token_ids += generated.token_ids
                finished = flow.settle(work, unit, decoded(generated, self.prompts)) or finished
        row = finished.row
        result.text, result.error, result.token_ids = row["text"], row["error"], token_ids
        result.n_image_tokens = row.get("n_image_tokens") or 0
        result.blocks = [{"order": block["order"], "label": block["label"], "score": block["score"],
                          "box": [block["x0"], block["y0"], block["x1"], block["y1"]], "prompt": block["prompt"],
                          "text": block["text"], "finish_reason": block["finish_reason"]}
                         for block in row.get("blocks") or []]
        result.timings = {"layout_s": page.layout_s, "total_s": time.perf_counter() - started}

    def close(self) -> None:
        if self.language is not None:
            self.language.close()
        if self._torch_threads is not None:
            import torch

            torch.set_num_threads(self._torch_threads)
            self._torch_threads = None
