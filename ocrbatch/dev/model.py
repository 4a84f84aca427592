"""Random-weight PaddleOCR-VL models for tests and benchmarks.

No model weights can be downloaded where this project is developed and
tested, so it builds its own models: the real architecture
(``PaddleOCRVLForConditionalGeneration``), random weights, a SentencePiece
tokenizer trained here that carries the real special tokens, and processor
files with a chat template equivalent to the official one. ``tiny`` is small
enough for CI; ``full`` has the real 0.9B dimensions, for benchmarks. The
``official`` layout is shaped as PaddlePaddle's releases are: a flat
remote-code ``config.json``, PaddlePaddle's weight names, an output
projection (``lm_head``) of its own and the release's processor settings.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = [
    "<|begin_of_sentence|>",
    "<|end_of_sentence|>",
    "<|IMAGE_START|>",
    "<|IMAGE_PLACEHOLDER|>",
    "<|IMAGE_END|>",
    "<|VIDEO_START|>",
    "<|VIDEO_PLACEHOLDER|>",
    "<|VIDEO_END|>",
    "<|LOC_BEGIN|>",
    "<|LOC_END|>",
    "<|LOC_SEP|>",
    "<|CROP_COL_SEP|>",
    "<|CROP_ROW_SEP|>",
    "<mask:1>",
]

# Equivalent to the chat template PaddlePaddle publishes with PaddleOCR-VL:
# images first, then the text of the user turn, then the assistant prefix.
# 1.0 ends the generation prompt with "Assistant: ", 1.5 and later with "Assistant:\n".
CHAT_TEMPLATE = """{%- if not add_generation_prompt is defined -%}{%- set add_generation_prompt = true -%}{%- endif -%}
{{- "<|begin_of_sentence|>" -}}
{%- for message in messages -%}
{%- if message["content"] is string -%}{%- set parts = [{"type": "text", "text": message["content"]}] -%}
{%- else -%}{%- set parts = message["content"] -%}{%- endif -%}
{%- if message["role"] == "system" -%}
{%- for part in parts if part["type"] == "text" -%}{{- part["text"] + "\\n" -}}{%- endfor -%}
{%- elif message["role"] == "user" -%}
{{- "User: " -}}
{%- for part in parts if part["type"] in ["image", "image_url"] -%}{{- "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>" -}}{%- endfor -%}
{%- for part in parts if part["type"] == "text" -%}{{- part["text"] -}}{%- endfor -%}
{{- "\\n" -}}
{%- elif message["role"] == "assistant" -%}
{{- "Assistant: " -}}
{%- for part in parts if part["type"] == "text" -%}{{- part["text"] -}}{%- endfor -%}
{{- "</s>" -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "ASSISTANT_PROMPT" -}}{%- endif -%}"""

GENERATION_PROMPTS = {"1.0": "Assistant: ", "1.5": "Assistant:\\n", "1.6": "Assistant:\\n"}
VERSIONS = tuple(GENERATION_PROMPTS)

# Image bounds in each release's preprocessor_config.json. 1.0: 147,384 to
# 2,822,400, as public transcriptions of PaddlePaddle/PaddleOCR-VL's file and
# PaddleX's defaults give them. 1.5: 112,896 to 1,003,520, as ports of
# PaddleOCR-VL-1.5 copy them. 1.6 could not be checked against its own file:
# 1.5's values, which PaddleX's 1.6 pipeline settings also use (max 1,003,520).
RELEASE_PIXEL_BOUNDS = {"1.0": (147384, 2822400), "1.5": (112896, 1003520), "1.6": (112896, 1003520)}


@dataclass(frozen=True)
class ModelSize:
    """Dimensions of a generated model."""

    vocab_size: int
    tokenizer_vocab: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    head_dim: int
    text_ffn: int
    mrope_section: tuple[int, int, int]
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_ffn: int
    min_pixels: int
    max_pixels: int
    # Larger than the real init so that random logits are well separated and
    # greedy decoding does not hinge on rounding noise.
    initializer_range: float
    dtype: str


SIZES = {
    "tiny": ModelSize(
        vocab_size=1200, tokenizer_vocab=1200,
        text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, head_dim=32, text_ffn=128,
        mrope_section=(4, 6, 6),
        vision_hidden=64, vision_layers=2, vision_heads=2, vision_ffn=128,
        min_pixels=112 * 112, max_pixels=672 * 672,
        initializer_range=0.25, dtype="float32",
    ),
    "full": ModelSize(
        vocab_size=103424, tokenizer_vocab=8000,
        text_hidden=1024, text_layers=18, text_heads=16, text_kv_heads=2, head_dim=128, text_ffn=3072,
        mrope_section=(16, 24, 24),
        vision_hidden=1152, vision_layers=27, vision_heads=16, vision_ffn=4304,
        min_pixels=384 * 384, max_pixels=1536 * 1536,
        initializer_range=0.02, dtype="bfloat16",
    ),
}

TASK_WORDS = [
    "User", "Assistant", "OCR", "Table", "Formula", "Chart", "Seal", "Recognition", "Spotting",
    "Picture", "Figure", "Total", "Page", "Invoice", "Date", "Name", "Amount",
]
SYLLABLES = [
    "a", "an", "ar", "be", "ca", "ch", "de", "di", "en", "er", "ex", "ga", "he", "in", "ing", "ion",
    "ka", "le", "lo", "ma", "men", "ne", "o", "on", "pe", "qu", "re", "ri", "sa", "st", "te", "th",
    "the", "to", "un", "ve", "wa", "y", "ze",
]
SYMBOLS = ["|", "-", "+", "=", "$", "\\frac", "{", "}", "^", "_", "(", ")", "#", "*", "%", "/", "<td>", "</td>"]


def _corpus(rng: random.Random, n_lines: int) -> list[str]:
    """Synthetic document-like text: words, numbers, tables, formulas, newlines."""

    def word() -> str:
        if rng.random() < 0.15:
            return rng.choice(TASK_WORDS)
        return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))

    lines = []
    for i in range(n_lines):
        words = [word() for _ in range(rng.randint(2, 14))]
        if i % 3 == 0:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 10**rng.randint(1, 7))))
        if i % 4 == 0:
            words.insert(rng.randrange(len(words)), rng.choice(SYMBOLS))
        if i % 11 == 0:
            words.append(rng.choice("表格文字识别公式图章"))
        line = " ".join(words)
        line = line[0].upper() + line[1:] + rng.choice([".", ",", ":", "?", "!", ";", ":\n", "\n"])
        lines.append(line)
    return lines


def train_tokenizer(vocab_size: int, seed: int) -> bytes:
    """Train a SentencePiece BPE model that carries PaddleOCR-VL's special tokens.

    Ids 0–2 are ``<unk>``, ``<s>``, ``</s>`` as in ERNIE's tokenizer; the
    special tokens follow as user-defined symbols.
    """
    import sentencepiece as spm

    rng = random.Random(seed)
    lines = _corpus(rng, 6000) + [f"{w}:" for w in TASK_WORDS] + ["OCR:\nAssistant: ", "User: "]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        user_defined_symbols=SPECIAL_TOKENS,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    return buffer.getvalue()


def _write_tokenizer(out: Path, model_proto: bytes, chat_template: str) -> None:
    (out / "tokenizer.model").write_bytes(model_proto)
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "processor_class": "PaddleOCRVLProcessor",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "cls_token": "<|begin_of_sentence|>",
        "sep_token": "<|end_of_sentence|>",
        "mask_token": "<mask:1>",
        "extra_special_tokens": [t for t in SPECIAL_TOKENS if t != "<mask:1>"],
        "image_token": "<|IMAGE_PLACEHOLDER|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "chat_template": chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))


LAYOUTS = ("transformers", "official")
_OFFICIAL_PREFIXES = (("model.projector.", "mlp_AR."), ("model.visual.", "visual."), ("model.language_model.", "model."))


# The remote code a release's files point to; transformers has its own classes for them.
_REMOTE_CODE = {
    "config": {
        "AutoConfig": "configuration_paddleocr_vl.PaddleOCRVLConfig",
        "AutoModel": "modeling_paddleocr_vl.PaddleOCRVLForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_paddleocr_vl.PaddleOCRVLForConditionalGeneration",
    },
    "processor": {
        "AutoImageProcessor": "image_processing_paddleocr_vl.PaddleOCRVLImageProcessor",
        "AutoProcessor": "processing_paddleocr_vl.PaddleOCRVLProcessor",
    },
}


def _write_preprocessor_config(out: Path, image_processor, extra: dict | None = None) -> None:
    """``preprocessor_config.json`` as PaddlePaddle's release has it (min/max pixels spelled out)."""
    size = image_processor.size
    preprocessor = {
        **(extra or {}),
        "image_processor_type": "PaddleOCRVLImageProcessor", "processor_class": "PaddleOCRVLProcessor",
        "min_pixels": size.shortest_edge, "max_pixels": size.longest_edge, "patch_size": 14, "merge_size": 2,
        "temporal_patch_size": 1, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
        "do_resize": True, "rescale_factor": 1 / 255, "resample": 3,
        "image_mean": list(image_processor.image_mean), "image_std": list(image_processor.image_std),
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))


def _release_config(config, dtype: str) -> dict:
    """``config.json`` as PaddlePaddle's releases ship it: the remote code's flat format (text
    settings at the top level, ERNIE's own keys) with ``tie_word_embeddings: false``.

    The keys follow ports that parse the 1.0 release's file; 1.5's and 1.6's files
    could not be seen and are taken to be the same (the architecture is).
    """
    text, vision = config.text_config, config.vision_config
    return {
        "architectures": ["PaddleOCRVLForConditionalGeneration"],
        "auto_map": _REMOTE_CODE["config"],
        "model_type": "paddleocr_vl",
        "compression_ratio": 1.0,
        "head_dim": text.head_dim,
        "hidden_act": text.hidden_act,
        "hidden_dropout_prob": 0.0,
        "hidden_size": text.hidden_size,
        "ignored_index": -100,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "max_sequence_length": None,
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "pad_token_id": text.pad_token_id,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_scaling": {"mrope_section": list(text.rope_parameters["mrope_section"]), "rope_type": "default",
                         "type": "default"},
        "rope_theta": text.rope_parameters["rope_theta"],
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "use_bias": text.use_bias,
        "use_cache": False,
        "use_flash_attention": False,
        "vocab_size": text.vocab_size,
        "weight_share_add_bias": True,
        "use_3d_rope": True,
        "rope_is_neox_style": True,
        # The release's ids belong to its tokenizer; these are the generated tokenizer's.
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "vision_config": {
            "architectures": ["PaddleOCRVisionModel"],
            "model_type": "paddleocr_vl",
            "attention_dropout": vision.attention_dropout,
            "hidden_act": vision.hidden_act,
            "hidden_size": vision.hidden_size,
            "image_size": vision.image_size,
            "intermediate_size": vision.intermediate_size,
            "layer_norm_eps": vision.layer_norm_eps,
            "num_attention_heads": vision.num_attention_heads,
            "num_channels": vision.num_channels,
            "num_hidden_layers": vision.num_hidden_layers,
            "pad_token_id": 0,
            "patch_size": vision.patch_size,
            "spatial_merge_size": vision.spatial_merge_size,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "torch_dtype": dtype,
        },
    }


def _rewrite_as_official(out: Path, config, dims: ModelSize, seed: int) -> None:
    """Reshape a saved model into a PaddlePaddle release: weight names, a separate
    ``lm_head``, the flat ``config.json``, and no ``processor_config.json`` (the release
    has none; its processor settings are in ``preprocessor_config.json``)."""
    import torch
    from safetensors.torch import load_file, save_file

    weights_file = out / "model.safetensors"
    weights = load_file(weights_file)
    renamed = {}
    for name, tensor in weights.items():
        for new, old in _OFFICIAL_PREFIXES:
            if name.startswith(new):
                name = old + name[len(new):]
                break
        renamed[name] = tensor
    # The release's output projection is a matrix of its own. Drawn from a generator of its
    # own, so every other weight equals the transformers layout's for the same seed.
    embeddings = renamed["model.embed_tokens.weight"]
    generator = torch.Generator().manual_seed(seed)
    lm_head = torch.randn(embeddings.shape, generator=generator) * dims.initializer_range
    renamed["lm_head.weight"] = lm_head.to(embeddings.dtype)
    save_file(renamed, weights_file, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(_release_config(config, dims.dtype), indent=2))
    (out / "processor_config.json").unlink()


def make_model(out_dir: str | Path, size: str = "tiny", seed: int = 0, version: str = "1.0",
               layout: str = "transformers") -> Path:
    """Write a random-weight PaddleOCR-VL model folder and return its path.

    The same ``size``, ``seed`` and ``version`` give byte-identical weights.
    ``AutoProcessor.from_pretrained`` and
    ``PaddleOCRVLForConditionalGeneration.from_pretrained`` load the result.
    ``layout="official"`` writes the files as PaddlePaddle's ``version``
    release has them: flat ``config.json`` with ``tie_word_embeddings: false``,
    weights named ``visual.*``, ``mlp_AR.*``, ``model.*`` plus an
    ``lm_head.weight`` that differs from the embeddings, and the release's
    ``preprocessor_config.json`` (its pixel bounds, mean and std 0.5).
    """
    import sentencepiece as spm
    import torch
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        PaddleOCRVLConfig,
        PaddleOCRVLForConditionalGeneration,
        PaddleOCRVLProcessor,
    )
    from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import (
        PaddleOCRVLImageProcessorPil,
    )

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if version not in VERSIONS:
        raise ValueError(f"unknown version {version!r}; choose one of {', '.join(VERSIONS)}")
    dims = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    chat_template = CHAT_TEMPLATE.replace("ASSISTANT_PROMPT", GENERATION_PROMPTS[version])
    model_proto = train_tokenizer(dims.tokenizer_vocab, seed)
    _write_tokenizer(out, model_proto, chat_template)
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    token_id = sp.piece_to_id

    config = PaddleOCRVLConfig(
        text_config=dict(
            vocab_size=dims.vocab_size,
            hidden_size=dims.text_hidden,
            intermediate_size=dims.text_ffn,
            num_hidden_layers=dims.text_layers,
            num_attention_heads=dims.text_heads,
            num_key_value_heads=dims.text_kv_heads,
            head_dim=dims.head_dim,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": list(dims.mrope_section)},
            initializer_range=dims.initializer_range,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=True,
            use_bias=False,
        ),
        vision_config=dict(
            hidden_size=dims.vision_hidden,
            intermediate_size=dims.vision_ffn,
            num_hidden_layers=dims.vision_layers,
            num_attention_heads=dims.vision_heads,
            patch_size=14,
            image_size=384,
            spatial_merge_size=2,
            rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
            initializer_range=dims.initializer_range,
        ),
        image_token_id=token_id("<|IMAGE_PLACEHOLDER|>"),
        video_token_id=token_id("<|VIDEO_PLACEHOLDER|>"),
        vision_start_token_id=token_id("<|IMAGE_START|>"),
        vision_end_token_id=token_id("<|IMAGE_END|>"),
        tie_word_embeddings=True,
        initializer_range=dims.initializer_range,
    )
    torch.manual_seed(seed)
    model = PaddleOCRVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Norm weights start at one; jitter them so a conversion that drops or
        # misplaces one of them changes the output.
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.add_(torch.randn_like(param) * 0.1)
    model = model.to(getattr(torch, dims.dtype))
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(out)

    tokenizer = AutoTokenizer.from_pretrained(out)
    if layout == "official":
        min_pixels, max_pixels = RELEASE_PIXEL_BOUNDS[version]
        image_processor = PaddleOCRVLImageProcessorPil(
            min_pixels=min_pixels, max_pixels=max_pixels, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    else:
        image_processor = PaddleOCRVLImageProcessorPil(min_pixels=dims.min_pixels, max_pixels=dims.max_pixels)
    processor = PaddleOCRVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)
    processor.save_pretrained(out)
    if layout == "official":
        _write_preprocessor_config(out, image_processor, extra={"auto_map": _REMOTE_CODE["processor"]})
        _rewrite_as_official(out, config, dims, seed)
    else:
        _write_preprocessor_config(out, image_processor)
    return out
