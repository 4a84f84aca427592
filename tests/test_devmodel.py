"""The random-checkpoint maker writes a real, loadable PaddleOCR-VL checkpoint."""

import hashlib

import pytest
from transformers import AutoProcessor, PaddleOCRVLForConditionalGeneration

from ocrbatch.devmodel import SPECIAL_TOKENS, make_model


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
