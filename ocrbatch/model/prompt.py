"""Prompts: task names, the model's chat template, and M-RoPE positions.

A PaddleOCR-VL prompt is text, then one image span per image, then text:
``<|begin_of_sentence|>User: <|IMAGE_START|>`` · image · ``<|IMAGE_END|>OCR:\\nAssistant: ``
(with several images, each wrapped in its own ``<|IMAGE_START|>`` … ``<|IMAGE_END|>``, one after
the other, as the chat template writes them).
:class:`PromptBuilder` renders it with the model's own chat template and
tokenizer (exactly what ``PaddleOCRVLProcessor`` feeds transformers), and
:class:`ImagePrompt` assigns the positions transformers' ``get_rope_index``
gives: text ``(p, p, p)``; image tokens ``(s, s + row, s + col)`` from the
image start ``s``; whatever follows an image (text or the next image) resumes
at ``s + max(rows, cols)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import OcrbatchError

TASK_PROMPTS = {
    "ocr": "OCR:",
    "table": "Table Recognition:",
    "formula": "Formula Recognition:",
    "chart": "Chart Recognition:",
    "seal": "Seal Recognition:",
    "spotting": "Spotting:",
}
# Tasks only PaddleOCR-VL 1.5 and later were trained on.
LATER_TASKS = ("seal", "spotting")
# Distinct prompt texts whose token ids are kept (the batch job uses one; server clients may send many).
PROMPT_CACHE_SIZE = 256
TASKS = tuple(TASK_PROMPTS)


@dataclass(frozen=True)
class ImagePrompt:
    """The token layout of one prompt around its images.

    ``text_ids`` holds the text before the first image, between each two images and after the
    last one (``len(grids) + 1`` pieces, any of them possibly empty); ``grids`` each image's
    token rows and columns, in prompt order.
    """

    text_ids: tuple[tuple[int, ...], ...]
    grids: tuple[tuple[int, int], ...]

    def __post_init__(self):
        if len(self.text_ids) != len(self.grids) + 1:
            raise ValueError(f"{len(self.grids)} images need {len(self.grids) + 1} text pieces, not {len(self.text_ids)}")

    @property
    def image_token_counts(self) -> tuple[int, ...]:
        return tuple(rows * cols for rows, cols in self.grids)

    @property
    def n_image_tokens(self) -> int:
        return sum(self.image_token_counts)

    @property
    def n_prompt_tokens(self) -> int:
        return sum(map(len, self.text_ids)) + self.n_image_tokens

    def spans(self) -> list[tuple[tuple[int, ...] | None, np.ndarray]]:
        """The prompt in order as ``(token_ids, positions)`` for text (positions shape (n,)) and
        ``(None, positions)`` for each image (shape (4, n): temporal, row, column, an unused fourth)."""
        spans, start = [], 0
        for index, text in enumerate(self.text_ids):
            if index:
                rows, cols = self.grids[index - 1]
                grid_rows, grid_cols = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
                positions = np.zeros((4, rows * cols), dtype=np.int32)
                positions[0] = start
                positions[1] = start + grid_rows.reshape(-1)
                positions[2] = start + grid_cols.reshape(-1)
                spans.append((None, positions))
                start += max(rows, cols)
            spans.append((text, np.arange(len(text), dtype=np.int32) + start))
            start += len(text)
        return spans

    def positions(self) -> np.ndarray:
        """Shape (3, n_prompt_tokens): every prompt token's M-RoPE position, as ``get_rope_index``."""
        return np.concatenate([np.broadcast_to(positions, (3, len(positions))) if ids is not None else positions[:3]
                               for ids, positions in self.spans()], axis=1)

    @property
    def first_generated_position(self) -> int:
        last_image = len(self.grids)
        start = sum(map(len, self.text_ids[:last_image])) + sum(max(grid) for grid in self.grids)
        return start + len(self.text_ids[-1])

    def input_ids(self, image_token_id: int) -> list[int]:
        """The full id sequence transformers sees (image spans as placeholder ids)."""
        ids = list(self.text_ids[0])
        for count, text in zip(self.image_token_counts, self.text_ids[1:]):
            ids += [image_token_id] * count
            ids += text
        return ids


class PromptBuilder:
    """Renders prompts with a model's chat template and tokenizer."""

    def __init__(self, model_path: str | Path, image_token_id: int, merge_size: int):
        self.model_path = Path(model_path)
        self.image_token_id = image_token_id
        self.merge_size = merge_size
        # Prompt texts come from clients (the server): remember a bounded number of them.
        self.text_parts = functools.lru_cache(maxsize=PROMPT_CACHE_SIZE)(self._text_parts)

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.model_path)
        except Exception as exc:
            raise OcrbatchError(f"{self.model_path}: cannot load the tokenizer ({exc})") from None

    @cached_property
    def chat_template(self) -> str:
        template = self.tokenizer.chat_template
        if not template:
            from transformers import AutoProcessor

            template = AutoProcessor.from_pretrained(self.model_path).chat_template
        if not template:
            raise OcrbatchError(f"{self.model_path}: the model has no chat template")
        return template

    @cached_property
    def supports_later_tasks(self) -> bool:
        """PaddleOCR-VL 1.5+ templates end the generation prompt with ``Assistant:\\n``."""
        return self.render("x").endswith(":\n")

    def render(self, text: str, n_images: int = 1) -> str:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def task_text(self, task: str) -> str:
        """The prompt text of a task, with a clear error for unknown or unsupported tasks."""
        if task not in TASK_PROMPTS:
            raise OcrbatchError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        if task in LATER_TASKS and not self.supports_later_tasks:
            raise OcrbatchError(f"task {task!r} needs a PaddleOCR-VL 1.5+ model; {self.model_path} is 1.0")
        return TASK_PROMPTS[task]

    def _text_parts(self, text: str, n_images: int = 1) -> tuple[tuple[int, ...], ...]:
        """Token ids around the ``n_images`` image placeholders of the rendered prompt (``n_images + 1`` pieces)."""
        ids = self.tokenizer(self.render(text, n_images), add_special_tokens=False)["input_ids"]
        spots = [i for i, token in enumerate(ids) if token == self.image_token_id]
        if len(spots) != n_images:
            raise OcrbatchError(f"{self.model_path}: chat template gives {len(spots)} image placeholders "
                                f"for {n_images} images")
        bounds = [-1, *spots, len(ids)]
        return tuple(tuple(ids[start + 1:end]) for start, end in zip(bounds, bounds[1:]))

    def build(self, text: str, *grids_thw: tuple[int, int, int]) -> ImagePrompt:
        """The prompt for ``text`` and one image of each ``grid_thw`` (in order)."""
        if not grids_thw:
            raise OcrbatchError("a prompt needs at least one image")
        grids = tuple((height // self.merge_size, width // self.merge_size) for _, height, width in grids_thw)
        return ImagePrompt(self.text_parts(text, len(grids)), grids)

    def decode(self, token_ids: list[int], keep_special_tokens: bool = False) -> str:
        """Generated ids as text; ``keep_special_tokens`` keeps tokens such as spotting's ``<|LOC_n|>``."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=not keep_special_tokens,
                                     clean_up_tokenization_spaces=False)
