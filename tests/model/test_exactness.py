"""The split pipeline reproduces transformers' greedy output token for token at F32."""

import pytest
import torch
from helpers import reference_generate

from ocrbatch.engine import Engine
from ocrbatch.layout.spotting import SPOTTING_PIXEL_BOUNDS, prepare
from ocrbatch.model.prompt import TASK_PROMPTS

MAX_NEW = 48


def test_positions_match_get_rope_index(engine_f32, reference, test_images):
    processor, model = reference
    for image, encoded in zip(test_images, engine_f32.vision.encode(test_images)):
        _, inputs = reference_generate(processor, model, image, "OCR:", max_new_tokens=1)
        expected, _ = model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])
        prompt = engine_f32.prompts.build("OCR:", encoded.grid_thw)
        assert prompt.input_ids(model.config.image_token_id) == inputs["input_ids"][0].tolist()
        assert torch.equal(torch.tensor(prompt.positions(), dtype=expected.dtype), expected[:, 0])
        assert prompt.first_generated_position == int(expected.max()) + 1


# Several images in one message, of different sizes and shapes (wide, tall, square), in orders
# where a later image is smaller than an earlier one: positions resume after each at max(rows, cols).
SEVERAL = [(0, 3), (2, 1, 4), (5, 0)]


@pytest.mark.parametrize("picks", SEVERAL, ids=lambda picks: "+".join(map(str, picks)))
def test_positions_of_several_images_match_get_rope_index(engine_f32, reference, test_images, picks):
    processor, model = reference
    images = [test_images[i] for i in picks]
    _, inputs = reference_generate(processor, model, images, "OCR:", max_new_tokens=1)
    expected, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])
    prompt = engine_f32.prompts.build("OCR:", *(encoded.grid_thw for encoded in engine_f32.vision.encode(images)))
    assert len(prompt.grids) == len(images)
    assert prompt.input_ids(model.config.image_token_id) == inputs["input_ids"][0].tolist()
    assert torch.equal(torch.tensor(prompt.positions(), dtype=expected.dtype), expected[:, 0])
    assert prompt.first_generated_position == int(expected.max()) + 1


@pytest.mark.slow
@pytest.mark.parametrize("picks", SEVERAL, ids=lambda picks: "+".join(map(str, picks)))
def test_several_images_greedy_tokens_identical_to_transformers(engine_f32, reference, test_images, picks):
    processor, model = reference
    images = [test_images[i] for i in picks]
    result = engine_f32.ocr_together(images, max_tokens=MAX_NEW)
    expected, _ = reference_generate(processor, model, images, "OCR:", MAX_NEW)
    assert result.error is None
    assert result.token_ids == expected
    assert result.n_image_tokens == sum(e.n_tokens for e in engine_f32.vision.encode(images))
    # Not what any one of the images alone gives: every image reached the model.
    alone = [engine_f32.ocr([image], max_tokens=MAX_NEW)[0].token_ids for image in images]
    assert all(tokens != expected for tokens in alone)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["ocr", "table", "formula", "chart"])
def test_greedy_tokens_identical_to_transformers(engine_f32, reference, test_images, task):
    processor, model = reference
    results = engine_f32.ocr(test_images, task=task, max_tokens=MAX_NEW)
    for image, result in zip(test_images, results):
        expected, _ = reference_generate(processor, model, image, TASK_PROMPTS[task], MAX_NEW)
        assert result.error is None
        assert result.token_ids == expected, f"{image.size} {task}"
        assert result.text == processor.decode(expected, skip_special_tokens=True)
        # transformers stops at end-of-sentence (dropped above) or after MAX_NEW tokens: so must we.
        assert result.finish_reason == ("length" if len(expected) == MAX_NEW else "stop"), f"{image.size} {task}"
    assert all(r.token_ids for r in results)


@pytest.mark.slow
def test_later_tasks_identical_on_a_15_model(tiny_model_15, test_images):
    from transformers import AutoProcessor, PaddleOCRVLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_15)
    model = PaddleOCRVLForConditionalGeneration.from_pretrained(tiny_model_15).eval()
    engine = Engine(tiny_model_15, quant="F32", max_tokens=24)
    for task in ("seal", "spotting", "ocr"):
        results = engine.ocr(test_images[:3], task=task)
        for image, result in zip(test_images[:3], results):
            if task == "spotting":  # as the model card prepares it: enlarged twice, within the spotting bounds
                bounds = {"size": {"shortest_edge": SPOTTING_PIXEL_BOUNDS[0], "longest_edge": SPOTTING_PIXEL_BOUNDS[1]}}
                expected, _ = reference_generate(processor, model, prepare(image), TASK_PROMPTS[task], 24, bounds)
            else:
                expected, _ = reference_generate(processor, model, image, TASK_PROMPTS[task], 24)
            assert result.token_ids == expected, f"{image.size} {task}"
    engine.close()


@pytest.mark.slow
def test_parallel_sequences_decode_like_one_at_a_time(tiny_model, test_images, engine_f32):
    parallel = Engine(tiny_model, quant="F32", max_tokens=32, n_seq_max=4)
    together = parallel.ocr(test_images, task="ocr")
    one_by_one = [engine_f32.ocr([image], task="ocr", max_tokens=32)[0] for image in test_images]
    assert [r.token_ids for r in together] == [r.token_ids for r in one_by_one]
    parallel.close()


@pytest.mark.slow
def test_f16_agreement_is_reported(tiny_model, reference, test_images, record_property):
    """F16 rounds weights, so a few tokens may flip; report how many still agree."""
    processor, model = reference
    engine = Engine(tiny_model, quant="F16", max_tokens=MAX_NEW)
    agree = total = 0
    for image, result in zip(test_images, engine.ocr(test_images, task="ocr")):
        expected, _ = reference_generate(processor, model, image, "OCR:", MAX_NEW)
        prefix = 0
        while prefix < min(len(expected), len(result.token_ids)) and expected[prefix] == result.token_ids[prefix]:
            prefix += 1
        agree += prefix
        total += len(expected)
    rate = agree / total
    record_property("f16_prefix_agreement", rate)
    print(f"\nF16 vs transformers F32: {rate:.1%} of greedy tokens agree before the first difference")
    assert rate > 0.5
    engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("version", ["1.0", "1.5"])
def test_release_shaped_model_identical_to_transformers(release_model, test_images, version):
    """A model folder shaped as PaddlePaddle publishes it: flat config, weights named visual.*,
    mlp_AR.*, model.*, an lm_head of its own (transformers projects with it) and the release's
    pixel bounds."""
    from transformers import AutoProcessor, PaddleOCRVLForConditionalGeneration

    release = release_model(version)
    processor = AutoProcessor.from_pretrained(release)
    model = PaddleOCRVLForConditionalGeneration.from_pretrained(release).eval()
    engine = Engine(release, quant="F32", max_tokens=24)
    for image, result in zip(test_images, engine.ocr(test_images)):
        expected, _ = reference_generate(processor, model, image, "OCR:", 24)
        assert result.error is None
        assert result.token_ids == expected, f"{image.size}"
    engine.close()


def test_sampling_is_reproducible_with_a_seed(engine_f32, test_images):
    from ocrbatch.model.language import Sampling

    image = test_images[0]
    hot = Sampling(temperature=1.5, top_p=0.95, seed=7)
    first = engine_f32.ocr([image], max_tokens=24, sampling=hot)[0].token_ids
    again = engine_f32.ocr([image], max_tokens=24, sampling=hot)[0].token_ids
    greedy = engine_f32.ocr([image], max_tokens=24)[0].token_ids
    assert first == again
    assert first != greedy
