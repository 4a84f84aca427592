"""The vision stage reproduces transformers' image features, batched or not."""

import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from ocrbatch.model.vision import VisionEncoder


def test_matches_transformers_get_image_features(tiny_model, reference, test_images):
    processor, model = reference
    encoder = VisionEncoder(tiny_model)
    encoded = encoder.encode(test_images)
    inputs = processor.image_processor(images=test_images, return_tensors="pt")
    with torch.inference_mode():
        expected = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    assert len(encoded) == len(test_images)
    for ours, theirs, grid in zip(encoded, expected, inputs["image_grid_thw"].tolist()):
        assert ours.grid_thw == tuple(grid)
        assert ours.embeddings.shape == tuple(theirs.shape)
        np.testing.assert_allclose(ours.embeddings, theirs.numpy(), atol=1e-4, rtol=0)


def test_batched_equals_one_by_one(tiny_model, test_images):
    encoder = VisionEncoder(tiny_model)
    batched = encoder.encode(test_images)
    for image, together in zip(test_images, batched):
        [alone] = encoder.encode([image])
        assert alone.grid_thw == together.grid_thw
        np.testing.assert_allclose(alone.embeddings, together.embeddings, atol=1e-4, rtol=0)


def test_token_count_prediction(tiny_model, test_images):
    encoder = VisionEncoder(tiny_model)
    for image, encoded in zip(test_images, encoder.encode(test_images)):
        assert encoder.n_tokens_for(*image.size) == encoded.n_tokens


def test_language_model_weights_stay_out_of_pytorch(tiny_model, reference):
    _, model = reference
    encoder = VisionEncoder(tiny_model)
    loaded = sum(p.numel() for p in encoder.visual.parameters()) + sum(p.numel() for p in encoder.projector.parameters())
    vision_only = sum(p.numel() for p in model.model.visual.parameters()) + sum(
        p.numel() for p in model.model.projector.parameters())
    assert loaded == vision_only
    assert loaded < sum(p.numel() for p in model.parameters()) - model.model.language_model.embed_tokens.weight.numel()


def test_bfloat16_is_close(tiny_model, test_images):
    fp32 = VisionEncoder(tiny_model).encode(test_images[:2])
    bf16 = VisionEncoder(tiny_model, dtype="bfloat16").encode(test_images[:2])
    for a, b in zip(fp32, bf16):
        assert a.embeddings.dtype == np.float32 and b.embeddings.dtype == np.float32
        scale = np.abs(a.embeddings).max()
        assert np.abs(a.embeddings - b.embeddings).max() < 0.1 * scale


def test_official_weight_names_are_understood():
    from ocrbatch.model.weights import canonical_name

    assert canonical_name("mlp_AR.linear_1.weight") == "model.projector.linear_1.weight"
    assert canonical_name("visual.vision_model.post_layernorm.weight") == "model.visual.vision_model.post_layernorm.weight"
    assert canonical_name("model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3.mlp.up_proj.weight"
    assert canonical_name("model.language_model.norm.weight") == "model.language_model.norm.weight"
    assert canonical_name("visual.vision_model.head.probe") is None
    assert canonical_name("lm_head.weight") == "lm_head.weight"


def test_int8_linear_tracks_float_linear():
    from ocrbatch.model.int8 import Int8Linear, swap_linears

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.GELU(), torch.nn.Linear(160, 48, bias=False))
    x = torch.randn(2, 37, 96)
    with torch.inference_mode():
        expected = block(x)
    weights = {f"{i}.weight": block[i].weight.detach().clone() for i in (0, 2)}
    bias = block[0].bias.detach().clone()
    swapped = swap_linears(block, "")
    assert set(swapped) == set(weights) and all(isinstance(m, Int8Linear) for m in swapped.values())
    for name, layer in swapped.items():
        layer.load_weight(weights[name])
    block[0].bias.copy_(bias)
    assert block[0].qweight.dtype == torch.int8 and block[2].bias is None
    with torch.inference_mode():
        got = block(x)
    assert got.shape == expected.shape
    relative = (got - expected).norm() / expected.norm()
    assert relative < 0.02, relative
    # A zero row (padding) must not divide by zero.
    with torch.inference_mode():
        assert torch.isfinite(block(torch.zeros(3, 96))).all()


def _relative_error(expected, got) -> float:
    return np.linalg.norm(expected.embeddings - got.embeddings) / np.linalg.norm(expected.embeddings)


def test_int8_vision_is_close_and_holds_int8_weights(tiny_model, test_images):
    fp32 = VisionEncoder(tiny_model).encode(test_images[:3])
    encoder = VisionEncoder(tiny_model, dtype="int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in encoder.visual.modules())
    assert {b.dtype for n, b in encoder.visual.named_buffers() if n.endswith("qweight")} == {torch.int8}
    for a, b in zip(fp32, encoder.encode(test_images[:3])):
        assert b.embeddings.dtype == np.float32 and a.grid_thw == b.grid_thw
        relative = _relative_error(a, b)
        assert relative < 0.1, relative


def test_int8_vision_compiles_its_blocks_and_matches_eager(tiny_model, test_images):
    from torch._dynamo.eval_frame import OptimizedModule

    encoder = VisionEncoder(tiny_model, dtype="int8")
    layer = encoder.visual.vision_model.encoder.layers[0]
    assert isinstance(layer.mlp, OptimizedModule) and isinstance(layer.self_attn.q_proj, OptimizedModule)
    images = test_images[:4]
    compiled = encoder.encode(images)
    # Another batch composition and a page encoded from a thread (as the server does) reuse the compiled pieces.
    from_thread = []
    worker = threading.Thread(target=lambda: from_thread.extend(encoder.encode(images[1:3])))
    worker.start()
    worker.join()
    encoder.run_eagerly()
    eager = encoder.encode(images)
    for a, b in zip(eager, compiled):
        relative = _relative_error(a, b)
        assert relative < 0.02, relative
    for a, b in zip(eager[1:3], from_thread):
        relative = _relative_error(a, b)
        assert relative < 0.02, relative


def test_int8_vision_runs_eagerly_when_compiling_fails(tiny_model, test_images, tmp_path):
    """No working C++ compiler: the encoder says so once and still encodes."""
    script = f"""
import logging, numpy as np, torch
torch._inductor.config.cpp.cxx = (None, "/nonexistent/g++")
from ocrbatch.model.vision import VisionEncoder
from PIL import Image
logging.basicConfig(level=logging.WARNING)
image = Image.open({str(tmp_path / "page.png")!r})
expected = VisionEncoder({str(tiny_model)!r}).encode([image])[0].embeddings
encoder = VisionEncoder({str(tiny_model)!r}, dtype="int8")
got = [encoder.encode([image])[0].embeddings for _ in range(2)]
for g in got:
    print("relative", np.linalg.norm(g - expected) / np.linalg.norm(expected))
"""
    test_images[0].save(tmp_path / "page.png")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # nothing cached to fall back on
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("compiling the int8 vision encoder failed, running it eagerly") == 1, done.stderr
    assert "C++ compiler" in done.stderr
    relatives = [float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("relative")]
    assert len(relatives) == 2 and max(relatives) < 0.1, relatives


def test_int8_vision_refuses_gpu(tiny_model):
    from ocrbatch.errors import ModelError

    with pytest.raises(ModelError, match="CPU only"):
        VisionEncoder(tiny_model, dtype="int8", device="cuda")


def test_truncated_weights_name_the_file(tiny_model, tmp_path):
    from ocrbatch.errors import ModelError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelError, match=r"model\.safetensors: .*(truncated|unreadable)"):
        VisionEncoder(broken)
