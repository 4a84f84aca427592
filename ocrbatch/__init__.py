"""ocrbatch: batch document OCR with PaddleOCR-VL split between PyTorch and llama.cpp."""

from .engine import Engine, OcrResult
from .errors import InputError, ModelError, OcrbatchError

__all__ = ["Engine", "OcrResult", "OcrbatchError", "ModelError", "InputError"]
