"""The random-model maker writes a real, loadable PaddleOCR-VL model folder."""

import hashlib

import pytest
from transformers import AutoProcessor, PaddleOCRVLForConditionalGeneration

from ocrbatch.dev.model import SPECIAL_TOKENS, make_model


def test_transformers_loads_it(tiny_model):
    processor = AutoProcessor.from_pretrained(tiny_model)
    model = PaddleOCRVLForConditionalGeneration.from_pretrained(tiny_model)
    assert model.config.model_type == "paddleocr_vl"
    assert processor.tokenizer.convert_tokens_to_ids("<|IMAGE_PLACEHOLDER|>") == model.config.image_token_id
    for token in SPECIAL_TOKENS:
        ids = processor.tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len([i for i in ids if processor.tokenizer.convert_ids_to_tokens(i) == token]) == 1, token


def test_chat_templates_match_the_official_formats(tiny_model, tiny_model_15):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "OCR:"}]}]
    rendered = AutoProcessor.from_pretrained(tiny_model).apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == "<|begin_of_sentence|>User: <|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>OCR:\nAssistant: "
    rendered = AutoProcessor.from_pretrained(tiny_model_15).apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == "<|begin_of_sentence|>User: <|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>OCR:\nAssistant:\n"


def _weights_digest(folder):
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.slow
def test_same_seed_gives_identical_weights(tmp_path, tiny_model):
    again = make_model(tmp_path / "again", size="tiny", seed=0)
    other = make_model(tmp_path / "other", size="tiny", seed=5)
    assert _weights_digest(again) == _weights_digest(tiny_model)
    assert _weights_digest(other) != _weights_digest(tiny_model)


def test_preprocessor_config_spells_out_pixel_bounds(tiny_model):
    import json

    config = json.loads((tiny_model / "preprocessor_config.json").read_text())
    assert config["min_pixels"] == 112 * 112 and config["max_pixels"] == 672 * 672
    assert AutoProcessor.from_pretrained(tiny_model).image_processor.size.longest_edge == 672 * 672


def test_official_layout_is_shaped_as_the_release(release_model, tiny_model):
    import json

    import torch
    from safetensors.torch import load_file

    release = release_model("1.0")
    config = json.loads((release / "config.json").read_text())
    assert "text_config" not in config and config["hidden_size"] == 64 and config["num_hidden_layers"] == 2
    assert config["tie_word_embeddings"] is False and config["rope_scaling"]["mrope_section"] == [4, 6, 6]
    assert config["vision_config"]["model_type"] == "paddleocr_vl"
    assert not (release / "processor_config.json").exists()

    weights = load_file(release / "model.safetensors")
    assert {name.split(".")[0] for name in weights} == {"visual", "mlp_AR", "model", "lm_head"}
    assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    # Every other weight is the transformers layout's, renamed.
    model = PaddleOCRVLForConditionalGeneration.from_pretrained(tiny_model)
    ours = {name: tensor for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    assert len(ours) == len(weights) - 1
    renamed = {"model.visual.": "visual.", "model.projector.": "mlp_AR.", "model.language_model.": "model."}
    for name, tensor in ours.items():
        prefix = next(p for p in renamed if name.startswith(p))
        assert torch.equal(tensor, weights[renamed[prefix] + name[len(prefix):]]), name


def test_transformers_projects_with_the_release_lm_head(release_model):
    """The premise of the converter's tying rule: transformers' config parses the release's
    flat config as tied, yet its model keeps the stored lm_head."""
    import torch
    from safetensors.torch import load_file

    release = release_model("1.0")
    model = PaddleOCRVLForConditionalGeneration.from_pretrained(release)
    assert model.config.tie_word_embeddings is True
    assert torch.equal(model.lm_head.weight, load_file(release / "model.safetensors")["lm_head.weight"])


@pytest.mark.parametrize("version, bounds, generation_prompt", [
    ("1.0", (147384, 2822400), "Assistant: "),
    ("1.5", (112896, 1003520), "Assistant:\n"),
])
def test_official_layout_writes_the_release_processor(release_model, version, bounds, generation_prompt):
    import json

    release = release_model(version)
    preprocessor = json.loads((release / "preprocessor_config.json").read_text())
    assert (preprocessor["min_pixels"], preprocessor["max_pixels"]) == bounds
    assert preprocessor["image_mean"] == preprocessor["image_std"] == [0.5, 0.5, 0.5]
    processor = AutoProcessor.from_pretrained(release)
    size = processor.image_processor.size
    assert (size.shortest_edge, size.longest_edge) == bounds
    assert tuple(processor.image_processor.image_mean) == (0.5, 0.5, 0.5)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "OCR:"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True).endswith("OCR:\n" + generation_prompt)


@pytest.mark.slow
def test_cli_writes_a_16_release(tmp_path):
    import json

    from click.testing import CliRunner

    from ocrbatch.cli.main import main

    folder = tmp_path / "release-1.6"
    result = CliRunner().invoke(main, ["dev", "make-model", str(folder), "--layout", "official", "--version", "1.6"])
    assert result.exit_code == 0, result.output
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    assert (preprocessor["min_pixels"], preprocessor["max_pixels"]) == (112896, 1003520)
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "OCR:"}]}]
    rendered = AutoProcessor.from_pretrained(folder).apply_chat_template(messages, add_generation_prompt=True)
    assert rendered.endswith("OCR:\nAssistant:\n")
