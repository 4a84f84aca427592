"""Model weights → GGUF conversion, quantization, caching and validation."""

import time

import numpy as np
import pytest
from click.testing import CliRunner

from ocrbatch.cli.main import main
from ocrbatch.engine import Engine
from ocrbatch.errors import ModelError
from ocrbatch.model.gguf import QUANTS, convert, inspect_gguf


def test_f32_gguf_is_self_contained(tiny_model):
    import gguf

    path = convert(tiny_model, "F32")
    reader = gguf.GGUFReader(str(path))
    value = lambda key: reader.fields[key].contents()  # noqa: E731
    assert value("general.architecture") == "paddleocr"
    assert value("paddleocr.rope.dimension_sections") == [4, 6, 6, 0]
    assert value("paddleocr.attention.key_length") == 32
    assert value("paddleocr.block_count") == 2
    assert value("tokenizer.ggml.model") == "llama"
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == 1200 and tokens[:3] == ["<unk>", "<s>", "</s>"]
    types = value("tokenizer.ggml.token_type")
    assert types[tokens.index("<|IMAGE_START|>")] == gguf.TokenType.CONTROL
    assert len(value("tokenizer.ggml.scores")) == len(tokens)
    assert value("tokenizer.ggml.eos_token_id") == 2
    assert "<|IMAGE_START|>" in value("tokenizer.chat_template")
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.1.ffn_down.weight"} <= names
    assert "output.weight" not in names  # tied to the embeddings, as in the model folder


def test_loads_in_plain_llama_cpp(tiny_model):
    from ocrbatch.machine.llama_runtime import llama_cpp_module

    llm = llama_cpp_module().Llama(model_path=str(convert(tiny_model, "Q8_0")), n_ctx=256, verbose=False)
    assert llm.metadata["general.architecture"] == "paddleocr"
    # llama.cpp's own tokenizer reads our vocabulary the way transformers does.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model)
    text = "<|begin_of_sentence|>User: <|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>Table Recognition:\nAssistant: "
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf(text, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("quant", QUANTS)
def test_every_quant_converts_and_runs(tiny_model, test_images, quant):
    path = convert(tiny_model, quant)
    assert inspect_gguf(path).quant == quant
    engine = Engine(tiny_model, quant=quant, max_tokens=6)
    [result] = engine.ocr(test_images[:1])
    assert result.error is None and len(result.token_ids) >= 1
    engine.close()


def test_quantized_files_are_smaller(tiny_model):
    sizes = {q: convert(tiny_model, q).stat().st_size for q in ("F32", "F16", "Q8_0", "Q4_0")}
    assert sizes["F32"] > sizes["F16"] > sizes["Q8_0"] > sizes["Q4_0"]


def test_second_conversion_is_cached(tiny_model):
    first = convert(tiny_model, "Q4_K_M")
    stamp = first.stat().st_mtime_ns
    started = time.perf_counter()
    second = convert(tiny_model, "Q4_K_M")
    assert second == first and second.stat().st_mtime_ns == stamp
    assert time.perf_counter() - started < 2


def test_cache_key_follows_model_content(tmp_path, tiny_model):
    import shutil

    copy = tmp_path / "tiny-1.0"
    shutil.copytree(tiny_model, copy)
    assert convert(copy, "F16").name == convert(tiny_model, "F16").name
    config = (copy / "generation_config.json")
    config.write_text(config.read_text().replace('"eos_token_id": 2', '"eos_token_id": 1'))
    assert convert(copy, "F16").name != convert(tiny_model, "F16").name


def test_cli_prints_path_and_copies(tmp_path, tiny_model):
    out = tmp_path / "lm.gguf"
    result = CliRunner().invoke(main, ["convert", str(tiny_model), "--quant", "q8_0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out)
    assert inspect_gguf(out).quant == "Q8_0"


def test_existing_gguf_is_accepted_and_requantized(tiny_model):
    f16 = convert(tiny_model, "F16")
    assert convert(f16, "F16") == f16
    q4 = convert(f16, "Q4_0")
    assert q4 != f16 and inspect_gguf(q4).quant == "Q4_0"


def test_gguf_without_rope_sections_is_an_error_not_a_crash(tmp_path, tiny_model):
    import gguf

    reader = gguf.GGUFReader(str(convert(tiny_model, "F32")))
    bad = tmp_path / "no-sections.gguf"
    writer = gguf.GGUFWriter(str(bad), "paddleocr")
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture", "paddleocr.rope.dimension_sections")):
            continue
        writer.add_key_value(field.name, field.contents(), field.types[0],
                             sub_type=field.types[-1] if len(field.types) > 1 else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_shape=None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="dimension_sections"):
        inspect_gguf(bad)
    with pytest.raises(ModelError, match="no-sections.gguf"):
        Engine(tiny_model, gguf=bad, quant="F32")


def test_not_a_gguf(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelError, match="junk.gguf"):
        inspect_gguf(junk)


def _gguf_tensors(path) -> dict:
    import gguf

    return {tensor.name: np.array(tensor.data) for tensor in gguf.GGUFReader(str(path)).tensors}


def test_own_lm_head_becomes_output_weight(release_model):
    """PaddlePaddle's releases project with an lm_head of their own, though their flat config parses as tied."""
    from safetensors.torch import load_file

    release = release_model("1.0")
    weights = load_file(release / "model.safetensors")
    tensors = _gguf_tensors(convert(release, "F32"))
    assert np.array_equal(tensors["output.weight"], weights["lm_head.weight"].numpy())
    assert np.array_equal(tensors["token_embd.weight"], weights["model.embed_tokens.weight"].numpy())


def test_lm_head_equal_to_embeddings_is_tied(tmp_path, release_model):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "same-head"
    shutil.copytree(release_model("1.0"), copy)
    weights = load_file(copy / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, copy / "model.safetensors")
    tensors = _gguf_tensors(convert(copy, "F32"))
    assert "token_embd.weight" in tensors and "output.weight" not in tensors


@pytest.fixture(scope="module")
def llama_cpp_converted(tmp_path_factory, release_model):
    """The release-shaped model's language model as llama.cpp's own convert_hf_to_gguf.py writes it."""
    import subprocess
    import sys

    from helpers import llama_cpp_source

    work = tmp_path_factory.mktemp("llama-cpp-converter")
    converter = llama_cpp_source(work) / "convert_hf_to_gguf.py"
    target = work / "release-1.0-f32.gguf"
    converted = subprocess.run([sys.executable, str(converter), str(release_model("1.0")), "--outtype", "f32",
                                "--outfile", str(target)], capture_output=True, text=True, timeout=600)
    assert converted.returncode == 0, converted.stderr[-3000:]
    return target


@pytest.mark.slow
def test_same_tensors_as_llama_cpps_own_converter(release_model, llama_cpp_converted):
    ours, theirs = _gguf_tensors(convert(release_model("1.0"), "F32")), _gguf_tensors(llama_cpp_converted)
    assert "output.weight" in theirs and ours.keys() == theirs.keys()
    assert [name for name in ours if not np.array_equal(ours[name], theirs[name])] == []


@pytest.mark.slow
def test_llama_cpp_converted_gguf_decodes_like_transformers(release_model, llama_cpp_converted, test_images):
    """--gguf with the file llama.cpp's converter writes gives transformers' greedy tokens."""
    from helpers import reference_generate
    from transformers import AutoProcessor, PaddleOCRVLForConditionalGeneration

    release = release_model("1.0")
    processor = AutoProcessor.from_pretrained(release)
    model = PaddleOCRVLForConditionalGeneration.from_pretrained(release).eval()
    engine = Engine(release, gguf=llama_cpp_converted, quant="F32", max_tokens=16)
    for image, result in zip(test_images[:3], engine.ocr(test_images[:3])):
        expected, _ = reference_generate(processor, model, image, "OCR:", 16)
        assert result.token_ids == expected, f"{image.size}"
    engine.close()
