"""``--vision-dtype auto``: the fastest agreeing precision, measured once per machine and remembered."""

import json

import numpy as np
import pytest

from ocrbatch.model import precision
from ocrbatch.model.precision import CPU_CANDIDATES, choose_precision
from ocrbatch.model.vision import VisionEncoder
from ocrbatch.model.weights import ModelWeights


class FakeClock:
    """Stands in for the probe: fixed seconds per precision, and the calls it got."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, []

    def __call__(self, vision_config, dtype):
        self.calls.append(dtype)
        return self.seconds[dtype]


@pytest.fixture
def vision_config(tiny_model):
    return ModelWeights.open(tiny_model).config.vision_config


@pytest.mark.parametrize("seconds, fastest", [({"float32": 2.6, "bfloat16": 3.9, "int8": 0.7}, "int8"),
                                              ({"float32": 1.0, "bfloat16": 1.6, "int8": 1.3}, "float32"),
                                              ({"float32": 2.9, "bfloat16": 1.0, "int8": 1.3}, "bfloat16")])
def test_the_fastest_candidate_wins_and_is_remembered(vision_config, tmp_path, seconds, fastest):
    clock = FakeClock(seconds)
    chosen = choose_precision(vision_config, "cpu", 2, tmp_path, measure=clock)
    assert chosen.dtype == fastest
    assert sorted(clock.calls) == sorted(CPU_CANDIDATES)
    assert chosen.seconds == seconds and "measured now" in chosen.reason

    again = choose_precision(vision_config, "cpu", 2, tmp_path, measure=clock)
    assert again.dtype == fastest and len(clock.calls) == len(CPU_CANDIDATES)  # no second probe
    assert "before" in again.reason


def test_another_thread_count_or_shape_is_measured_again(vision_config, tmp_path):
    clock = FakeClock({"float32": 2.0, "bfloat16": 3.0, "int8": 1.0})
    choose_precision(vision_config, "cpu", 2, tmp_path, measure=clock)
    choose_precision(vision_config, "cpu", 4, tmp_path, measure=clock)
    wider = vision_config.__class__.from_dict({**vision_config.to_dict(), "hidden_size": vision_config.hidden_size * 2})
    choose_precision(wider, "cpu", 2, tmp_path, measure=clock)
    assert len(clock.calls) == 3 * len(CPU_CANDIDATES)
    assert len(json.loads((tmp_path / precision.CACHE_NAME).read_text())) == 3


def test_an_unreadable_cache_is_measured_again(vision_config, tmp_path):
    (tmp_path / precision.CACHE_NAME).write_text("{not json")
    clock = FakeClock({"float32": 2.0, "bfloat16": 3.0, "int8": 1.0})
    assert choose_precision(vision_config, "cpu", 2, tmp_path, measure=clock).dtype == "int8"
    assert clock.calls


def test_a_gpu_takes_bfloat16_without_a_probe(vision_config, tmp_path):
    clock = FakeClock({})
    chosen = choose_precision(vision_config, "cuda", 2, tmp_path, measure=clock)
    assert chosen.dtype == "bfloat16" and clock.calls == []
    assert not (tmp_path / precision.CACHE_NAME).exists()


@pytest.mark.parametrize("dtype", CPU_CANDIDATES)
def test_the_probe_times_a_real_tower(vision_config, dtype):
    seconds = precision.probe_seconds(vision_config, dtype)
    assert 0 < seconds < 60


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_a_model_whose_config_names_bfloat16_is_built_and_probed_in_the_dtype_asked_for(
        tiny_model, tmp_path, dtype):
    """PaddlePaddle's releases name bfloat16 in config.json; the encoder and the probe's tower are built
    in the dtype asked for all the same. Built in the config's bfloat16, the probe's "float32" timed
    bfloat16, and int8's float32 layers met bfloat16 ones ('mixed dtype', on the full-size model)."""
    import shutil

    import torch

    from ocrbatch.model.vision import build_tower

    model = shutil.copytree(tiny_model, tmp_path / "model")
    config_file = model / "config.json"
    config_file.write_text(json.dumps(_naming_bfloat16(json.loads(config_file.read_text()))))
    config = ModelWeights.open(model).config.vision_config
    assert config.dtype == torch.bfloat16  # as the releases ship it
    wanted = {torch.float32 if dtype == "int8" else getattr(torch, dtype)}
    tower = build_tower(config, dtype)
    assert {p.dtype for name, p in tower.named_parameters() if "norm" in name} == wanted
    assert 0 < precision.probe_seconds(config, dtype) < 60
    encoder = VisionEncoder(model, dtype=dtype)
    assert {p.dtype for name, p in encoder.visual.named_parameters() if "norm" in name} == wanted


def _naming_bfloat16(config: dict) -> dict:
    """``config`` (and its vision config) naming bfloat16 as its dtype."""
    named = {**{key: value for key, value in config.items() if key != "torch_dtype"}, "dtype": "bfloat16"}
    if isinstance(named.get("vision_config"), dict):
        named["vision_config"] = _naming_bfloat16(named["vision_config"])
    return named


def test_the_encoder_runs_what_auto_chose_and_says_so(tiny_model, tmp_path, test_images, caplog):
    """With a remembered choice of int8, ``auto`` builds the int8 encoder: its output is int8's, not float32's."""
    first = VisionEncoder(tiny_model, dtype="auto", cache=tmp_path)  # a real probe of every candidate
    assert first.precision.dtype in CPU_CANDIDATES and set(first.precision.seconds) == set(CPU_CANDIDATES)

    stored = json.loads((tmp_path / precision.CACHE_NAME).read_text())
    for entry in stored.values():
        entry["dtype"] = "int8"
    (tmp_path / precision.CACHE_NAME).write_text(json.dumps(stored))
    with caplog.at_level("INFO", logger="ocrbatch.model.vision"):
        auto = VisionEncoder(tiny_model, dtype="auto", cache=tmp_path)
    assert auto.precision.dtype == "int8" and "before" in auto.precision.reason
    assert "vision precision: int8" in caplog.text

    [by_auto] = auto.encode(test_images[:1])
    [by_int8] = VisionEncoder(tiny_model, dtype="int8").encode(test_images[:1])
    [by_float32] = VisionEncoder(tiny_model, dtype="float32").encode(test_images[:1])
    np.testing.assert_allclose(by_auto.embeddings, by_int8.embeddings, atol=1e-5, rtol=0)
    assert np.abs(by_auto.embeddings - by_float32.embeddings).max() > 1e-5
