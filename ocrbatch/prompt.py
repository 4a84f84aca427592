"""Prompts: task names, the checkpoint's chat template, and M-RoPE positions.

A PaddleOCR-VL prompt is text, then one image span, then text:
``<|begin_of_sentence|>User: <|IMAGE_START|>`` · image · ``<|IMAGE_END|>OCR:\\nAssistant: ``.
:class:`PromptBuilder` renders it with the checkpoint's own chat template and
tokenizer (exactly what ``PaddleOCRVLProcessor`` feeds transformers), and
:class:`ImagePrompt` assigns the positions transformers' ``get_rope_index``
gives: text ``(p, p, p)``; image tokens ``(s, s + row, s + col)`` from the
image start ``s``; text after the image resumes at ``s + max(rows, cols)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import OcrbatchError

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
    """The token layout of one prompt around one image."""

    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    grid_rows: int
    grid_cols: int

    @property
    def n_image_tokens(self) -> int:
        return self.grid_rows * self.grid_cols

    @property
    def n_prompt_tokens(self) -> int:
        return len(self.prefix_ids) + self.n_image_tokens + len(self.suffix_ids)

    def prefix_positions(self) -> np.ndarray:
        return np.arange(len(self.prefix_ids), dtype=np.int32)

    def image_positions(self) -> np.ndarray:
        """Shape (4, n_image_tokens): temporal, row, column and an unused fourth section."""
        start = len(self.prefix_ids)
        rows, cols = np.meshgrid(np.arange(self.grid_rows), np.arange(self.grid_cols), indexing="ij")
        positions = np.zeros((4, self.n_image_tokens), dtype=np.int32)
        positions[0] = start
        positions[1] = start + rows.reshape(-1)
        positions[2] = start + cols.reshape(-1)
        return positions

    @property
    def suffix_start(self) -> int:
        return len(self.prefix_ids) + max(self.grid_rows, self.grid_cols)

    def suffix_positions(self) -> np.ndarray:
        return np.arange(len(self.suffix_ids), dtype=np.int32) + self.suffix_start

    @property
    def first_generated_position(self) -> int:
        return self.suffix_start + len(self.suffix_ids)

    def input_ids(self, image_token_id: int) -> list[int]:
        """The full id sequence transformers sees (image span as placeholder ids)."""
        return [*self.prefix_ids, *([image_token_id] * self.n_image_tokens), *self.suffix_ids]


class PromptBuilder:
    """Renders prompts with a checkpoint's chat template and tokenizer."""

    def __init__(self, checkpoint_path: str | Path, image_token_id: int, merge_size: int):
        self.checkpoint_path = Path(checkpoint_path)
        self.image_token_id = image_token_id
        self.merge_size = merge_size
        # Prompt texts come from clients (the server): remember a bounded number of them.
        self.text_parts = functools.lru_cache(maxsize=PROMPT_CACHE_SIZE)(self._text_parts)

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.checkpoint_path)
        except Exception as exc:
            raise OcrbatchError(f"{self.checkpoint_path}: cannot load the tokenizer ({exc})") from None

    @cached_property
    def chat_template(self) -> str:
        template = self.tokenizer.chat_template
        if not template:
            from transformers import AutoProcessor

            template = AutoProcessor.from_pretrained(self.checkpoint_path).chat_template
        if not template:
            raise OcrbatchError(f"{self.checkpoint_path}: the checkpoint has no chat template")
        return template

    @cached_property
    def supports_later_tasks(self) -> bool:
        """PaddleOCR-VL 1.5+ templates end the generation prompt with ``Assistant:\\n``."""
        return self.render("x").endswith(":\n")

    def render(self, text: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def task_text(self, task: str) -> str:
        """The prompt text of a task, with a clear error for unknown or unsupported tasks."""
        if task not in TASK_PROMPTS:
            raise OcrbatchError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        if task in LATER_TASKS and not self.supports_later_tasks:
            raise OcrbatchError(f"task {task!r} needs a PaddleOCR-VL 1.5+ checkpoint; {self.checkpoint_path} is 1.0")
        return TASK_PROMPTS[task]

    def _text_parts(self, text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Token ids before and after the single image placeholder of the rendered prompt."""
        ids = self.tokenizer(self.render(text), add_special_tokens=False)["input_ids"]
        spots = [i for i, token in enumerate(ids) if token == self.image_token_id]
        if len(spots) != 1:
            raise OcrbatchError(
                f"{self.checkpoint_path}: chat template gives {len(spots)} image placeholders, expected 1"
            )
        return tuple(ids[: spots[0]]), tuple(ids[spots[0] + 1 :])

    def build(self, text: str, grid_thw: tuple[int, int, int]) -> ImagePrompt:
        prefix, suffix = self.text_parts(text)
        _, height, width = grid_thw
        return ImagePrompt(prefix, suffix, height // self.merge_size, width // self.merge_size)

    def decode(self, token_ids: list[int], keep_special_tokens: bool = False) -> str:
        """Generated ids as text; ``keep_special_tokens`` keeps tokens such as spotting's ``<|LOC_n|>``."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=not keep_special_tokens,
                                     clean_up_tokenization_spaces=False)
