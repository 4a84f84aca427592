"""Shared fixtures: tiny random models built by project code, test images, engines."""

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
    """``release_model(version)``: a tiny model shaped as PaddlePaddle's release of that version
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
    """transformers' own PaddleOCR-VL on the tiny model: the reference."""
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


@pytest.fixture(scope="module")
def live(engine_f32):
    """``ocrbatch serve``'s app under uvicorn in this process, on a real socket, with its own worker pool."""
    import socket
    import threading
    from types import SimpleNamespace

    import uvicorn
    from helpers import LONG

    from ocrbatch.backends.pool import WorkerPool
    from ocrbatch.serve.app import ServerSettings, create_app

    pool = WorkerPool(engine_f32.gguf_path, n_seq_max=2, n_ctx=engine_f32.context_size(2, LONG))
    app = create_app(engine_f32, pool, ServerSettings(model_name="tiny", max_queue=2, max_tokens_limit=LONG))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # connections queue here until uvicorn accepts them: no start-up wait
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    host, port = listener.getsockname()
    yield SimpleNamespace(url=f"http://{host}:{port}", address=(host, port), engine=engine_f32, pool=pool,
                          service=app.state.service)
    server.should_exit = True
    thread.join(timeout=30)
    pool.close()
    listener.close()
