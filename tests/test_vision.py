"""The vision stage reproduces transformers' image features, batched or not."""

import shutil

import numpy as np
import pytest
import torch

from ocrbatch.vision import VisionEncoder


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
    from ocrbatch.checkpoint import canonical_name

    assert canonical_name("mlp_AR.linear_1.weight") == "model.projector.linear_1.weight"
    assert canonical_name("visual.vision_model.post_layernorm.weight") == "model.visual.vision_model.post_layernorm.weight"
    assert canonical_name("model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3.mlp.up_proj.weight"
    assert canonical_name("model.language_model.norm.weight") == "model.language_model.norm.weight"
    assert canonical_name("visual.vision_model.head.probe") is None
    assert canonical_name("lm_head.weight") == "lm_head.weight"


def test_int8_linear_tracks_float_linear():
    from ocrbatch.int8_linear import Int8Linear, swap_linears

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


def test_int8_vision_is_close_and_holds_int8_weights(tiny_model, test_images):
    fp32 = VisionEncoder(tiny_model).encode(test_images[:3])
    encoder = VisionEncoder(tiny_model, dtype="int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in encoder.visual.modules())
    assert {b.dtype for n, b in encoder.visual.named_buffers() if n.endswith("qweight")} == {torch.int8}
    for a, b in zip(fp32, encoder.encode(test_images[:3])):
        assert b.embeddings.dtype == np.float32 and a.grid_thw == b.grid_thw
        relative = np.linalg.norm(a.embeddings - b.embeddings) / np.linalg.norm(a.embeddings)
        assert relative < 0.1, relative


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
