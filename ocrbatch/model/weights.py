"""Finding and reading a PaddleOCR-VL model.

A model is a Hugging Face–style folder (``config.json``, safetensors,
tokenizer and processor files), given either as a local path or as a Hub id
that ``huggingface_hub`` downloads. Weight names come in two spellings: the
official release (``visual.*``, ``mlp_AR.*``, ``model.layers.*``) and the one
transformers writes (``model.visual.*``, ``model.projector.*``,
``model.language_model.*``). :func:`canonical_name` maps both to the latter so
the vision and GGUF stages can each pick just the tensors they need.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

from ..errors import ModelError

# Files that decide what a model computes; used for content hashing.
_CONTENT_GLOBS = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "*.safetensors",
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_RENAMES = (
    (re.compile(r"^mlp_AR\."), "model.projector."),
    (re.compile(r"^visual\."), "model.visual."),
    (re.compile(r"^model\.(?!visual\.|projector\.|language_model\.)"), "model.language_model."),
)
_IGNORED = re.compile(r"(^|\.)packing_position_embedding\.|vision_model\.head\.")

VISION_PREFIX = "model.visual."
PROJECTOR_PREFIX = "model.projector."
LANGUAGE_PREFIX = "model.language_model."
LM_HEAD = "lm_head.weight"


def canonical_name(name: str) -> str | None:
    """Map a stored weight name to transformers' naming; ``None`` for weights nobody uses."""
    if _IGNORED.search(name):
        return None
    for pattern, replacement in _RENAMES:
        if pattern.search(name):
            return pattern.sub(replacement, name, count=1)
    return name


def resolve_model_path(model: str | Path) -> Path:
    """Return a local model folder for ``model`` (a folder or a Hub id).

    Hub ids are downloaded with ``huggingface_hub``; without network access the
    error says to pass a local folder instead.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{model}: not a model folder (expected a folder with config.json)")
        return path
    if not _HUB_ID.match(str(model)):
        raise ModelError(f"{model}: no such model folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                str(model),
                allow_patterns=["*.json", "*.jinja", "*.model", "*.safetensors", "*.txt"],
            )
        )
    except Exception as exc:  # the hub client raises many unrelated types offline
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{model}: could not download from the Hugging Face Hub ({reason}); "
            "if this machine is offline, pass a local model folder instead"
        ) from None


@dataclass
class ModelWeights:
    """A PaddleOCR-VL model folder with its configuration parsed."""

    path: Path

    @classmethod
    def open(cls, model: str | Path) -> "ModelWeights":
        """Resolve ``model`` and check that it looks like a PaddleOCR-VL model."""
        weights = cls(resolve_model_path(model))
        _ = weights.config  # parse now so a broken folder fails here, with its name
        if not weights.weight_files:
            raise ModelError(f"{weights.path}: no *.safetensors weights in the model folder")
        return weights

    @cached_property
    def config(self):
        from transformers import PaddleOCRVLConfig

        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise ModelError(f"{self.path}: missing config.json, not a model folder")
        try:
            raw = json.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{config_file}: unreadable config ({exc})") from None
        if raw.get("model_type") != "paddleocr_vl":
            raise ModelError(
                f"{config_file}: model_type is {raw.get('model_type')!r}, expected 'paddleocr_vl'"
            )
        try:
            return PaddleOCRVLConfig.from_pretrained(self.path)
        except Exception as exc:
            raise ModelError(f"{config_file}: invalid PaddleOCR-VL config ({exc})") from None

    @property
    def text_config(self):
        return self.config.text_config

    @property
    def vision_config(self):
        return self.config.vision_config

    @cached_property
    def generation_config(self) -> dict:
        file = self.path / "generation_config.json"
        if not file.is_file():
            return {}
        try:
            return json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{file}: unreadable generation config ({exc})") from None

    @property
    def eos_token_ids(self) -> list[int]:
        """The ids that end generation, as ``transformers.generate`` reads them."""
        eos = self.generation_config.get("eos_token_id", self.text_config.eos_token_id)
        if eos is None:
            return []
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    @property
    def mrope_section(self) -> list[int]:
        rope = self.text_config.rope_parameters or {}
        return list(rope.get("mrope_section") or [16, 24, 24])

    @property
    def rope_theta(self) -> float:
        return float((self.text_config.rope_parameters or {}).get("rope_theta", 500000.0))

    @cached_property
    def weight_files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))

    def tensors(self, prefixes: tuple[str, ...]) -> Iterator[tuple[str, object]]:
        """Yield ``(canonical_name, torch tensor)`` for stored weights whose canonical name starts with a prefix.

        Only the selected tensors are read from disk: the vision stage never
        pulls the language model into memory, nor the converter the vision tower.
        """
        for file in self.weight_files:
            try:
                yield from _read_safetensors(file, prefixes)
            except ModelError:
                raise
            except Exception as exc:
                raise ModelError(f"{file}: unreadable weights ({exc})") from None

    def content_hash(self) -> str:
        """SHA-256 over every file that determines the model's behaviour."""
        digest = hashlib.sha256()
        files = sorted({f for pattern in _CONTENT_GLOBS for f in self.path.glob(pattern)})
        for file in files:
            digest.update(file.name.encode() + b"\0")
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()


_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def _read_safetensors(file: Path, prefixes: tuple[str, ...]) -> Iterator[tuple[str, object]]:
    """Read selected tensors of a safetensors file with plain reads, one tensor at a time.

    Written by hand rather than with ``safetensors.safe_open`` because that
    maps the file: every page it touches stays resident in this process, so
    loading the vision tower from a 1.6 GB model raised the peak RSS by
    the tower's size on disk on top of the weights themselves. Plain reads go
    through the page cache, which is not charged to the process.
    """
    import struct

    import torch

    size = file.stat().st_size
    with open(file, "rb") as handle:
        header_size = struct.unpack("<Q", handle.read(8))[0]
        if header_size > size - 8:
            raise ModelError(f"{file}: unreadable weights (header of {header_size} bytes in a {size}-byte file)")
        header = json.loads(handle.read(header_size))
        data_start = 8 + header_size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            canonical = canonical_name(name)
            if canonical is None or not canonical.startswith(prefixes):
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ModelError(f"{file}: weight {name} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            buffer = bytearray(end - begin)
            handle.seek(data_start + begin)
            if handle.readinto(buffer) != len(buffer):
                raise ModelError(f"{file}: truncated weights (weight {name} runs past the end of the file)")
            tensor = (torch.frombuffer(buffer, dtype=getattr(torch, dtype)) if buffer
                      else torch.empty(0, dtype=getattr(torch, dtype)))
            yield canonical, tensor.reshape(info["shape"])
