"""Shared fixtures: tiny random checkpoints built by project code, test images, engines."""

from __future__ import annotations

import os

import pytest
from helpers import document_image, settled_pdfs


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Converted GGUFs go to a per-session cache, never the user's."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["OCRBATCH_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from ocrbatch.dev.model import make_model

    return make_model(tmp_path_factory.mktemp("tiny") / "tiny-1.0", size="tiny", seed=0, version="1.0")


@pytest.fixture(scope="session")
def tiny_model_15(tmp_path_factory):
    from ocrbatch.dev.model import make_model

    return make_model(tmp_path_factory.mktemp("tiny15") / "tiny-1.5", size="tiny", seed=1, version="1.5")


@pytest.fixture(scope="session")
def release_model(tmp_path_factory):
    """``release_model(version)``: a tiny checkpoint shaped as PaddlePaddle's release of that version
    (``--layout official``: flat config, its own lm_head, the release's processor files), built once.
    Seed 0, so every weight but the lm_head equals ``tiny_model``'s."""
    from ocrbatch.dev.model import make_model

    built = {}

    def build(version: str = "1.0"):
        if version not in built:
            folder = tmp_path_factory.mktemp("release") / f"release-{version}"
            built[version] = make_model(folder, size="tiny", seed=0, version=version, layout="official")
        return built[version]

    return build


@pytest.fixture
def docs(tmp_path):
    """Three settled two-page text PDFs."""
    return settled_pdfs(tmp_path / "docs", 3, 2)


# (width, height): ordinary, below the tiny processor's min-pixels bound, very
# wide, tall, square, and one above its max-pixels bound.
IMAGE_SIZES = [(300, 200), (40, 30), (1400, 60), (180, 520), (333, 333), (900, 700)]


@pytest.fixture(scope="session")
def test_images():
    return [document_image(w, h, seed=i) for i, (w, h) in enumerate(IMAGE_SIZES)]


@pytest.fixture(scope="session")
def reference(tiny_model):
    """transformers' own PaddleOCR-VL on the tiny checkpoint: the reference."""
    from transformers import AutoProcessor, PaddleOCRVLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model)
    model = PaddleOCRVLForConditionalGeneration.from_pretrained(tiny_model).eval()
    return processor, model


@pytest.fixture(scope="session")
def engine_f32(tiny_model):
    from ocrbatch.engine import Engine

    engine = Engine(tiny_model, quant="F32", max_tokens=48)
    yield engine
    engine.close()
