"""ModelWeights → GGUF for the language model, with quantization and a cache.

The ERNIE-4.5 language model of a PaddleOCR-VL model is written as a
self-contained GGUF (architecture ``paddleocr``: hyper-parameters, M-RoPE
sections, the full SentencePiece vocabulary with scores and token types,
special-token ids and the chat template) with :class:`gguf.GGUFWriter`, so it
also loads in stock llama.cpp tools. Quantized files are made from the F32
file with ``llama_cpp.llama_model_quantize``. Results are cached by model
content, quant and converter version, so converting twice is instant.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelError
from .weights import LANGUAGE_PREFIX, LM_HEAD, ModelWeights

# Bump when the written GGUF changes, so cached files are rebuilt.
# 2: a model's own lm_head is written as output.weight (1 dropped it).
CONVERTER_VERSION = "2"
ARCH = "paddleocr"

# llama.cpp's llama_ftype values (include/llama.h) for the quants we offer.
QUANT_FTYPES = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q8_0": 7,
    "Q4_K_M": 15,
    "Q5_K_M": 17,
}
QUANTS = tuple(QUANT_FTYPES)


def cache_dir(override: str | Path | None = None) -> Path:
    """The cache folder: ``override``, else ``$OCRBATCH_CACHE_DIR``, else ``~/.cache/ocrbatch``."""
    chosen = override or os.environ.get("OCRBATCH_CACHE_DIR") or Path.home() / ".cache" / "ocrbatch"
    path = Path(chosen).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class GGUFInfo:
    """What the rest of the pipeline needs to know about a language-model GGUF."""

    path: Path
    architecture: str
    n_embd: int
    n_vocab: int
    rope_sections: tuple[int, ...]
    file_type: int | None

    @property
    def quant(self) -> str | None:
        names = {v: k for k, v in QUANT_FTYPES.items()}
        return names.get(self.file_type) if self.file_type is not None else None


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Read a GGUF's metadata and check it is a usable PaddleOCR-VL language model.

    llama.cpp aborts the whole process on some bad files (for example missing
    M-RoPE sections); checking here turns that into an error naming the file.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ModelError(f"{path}: not a readable GGUF file ({exc})") from None

    def value(key: str):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    if arch != ARCH:
        raise ModelError(f"{path}: architecture is {arch!r}, expected {ARCH!r} (a PaddleOCR-VL language model)")
    sections = tuple(value(f"{ARCH}.rope.dimension_sections") or ())
    if len(sections) < 3 or min(sections[:3]) <= 0:
        raise ModelError(f"{path}: missing or invalid {ARCH}.rope.dimension_sections {list(sections)}")
    n_embd = value(f"{ARCH}.embedding_length")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if n_embd is None or tokens is None:
        raise ModelError(f"{path}: missing embedding length or vocabulary")
    return GGUFInfo(
        path=path,
        architecture=arch,
        n_embd=int(n_embd),
        n_vocab=len(tokens.data),
        rope_sections=sections,
        file_type=value("general.file_type"),
    )


def _vocabulary(weights: ModelWeights, vocab_size: int):
    """Tokens, scores and llama.cpp token types from the model's SentencePiece model."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2

    sp_file = weights.path / "tokenizer.model"
    if not sp_file.is_file():
        raise ModelError(f"{weights.path}: no tokenizer.model (a SentencePiece vocabulary is needed for the GGUF)")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(sp_file.read_bytes())
    except Exception as exc:
        raise ModelError(f"{sp_file}: unreadable SentencePiece model ({exc})") from None

    # SentencePiece piece types and llama.cpp token types share their numbering.
    tokens = [piece.piece.encode("utf-8") for piece in proto.pieces]
    scores = [piece.score for piece in proto.pieces]
    types = [int(piece.type) for piece in proto.pieces]

    # Tokens the HF tokenizer adds on top (ids past the SentencePiece model), and
    # which of all tokens are special: llama.cpp wants those typed CONTROL.
    added = _added_tokens(weights)
    for token_id, data in sorted(added.items()):
        content = data["content"].encode("utf-8")
        token_type = gguf.TokenType.CONTROL if data.get("special") else gguf.TokenType.USER_DEFINED
        if token_id < len(tokens):
            if tokens[token_id] == content and types[token_id] != gguf.TokenType.UNKNOWN:
                types[token_id] = int(token_type)
            continue
        while len(tokens) < token_id:
            tokens.append(f"[PAD{len(tokens)}]".encode())
            scores.append(-1000.0)
            types.append(int(gguf.TokenType.UNUSED))
        tokens.append(content)
        scores.append(0.0)
        types.append(int(token_type))

    if len(tokens) > vocab_size:
        raise ModelError(f"{weights.path}: tokenizer has {len(tokens)} tokens, more than vocab_size {vocab_size}")
    while len(tokens) < vocab_size:  # the embedding matrix is larger than the tokenizer
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return tokens, scores, types, proto.normalizer_spec


def _added_tokens(weights: ModelWeights) -> dict[int, dict]:
    """Added tokens by id, from ``tokenizer.json`` and/or ``tokenizer_config.json``."""
    added: dict[int, dict] = {}
    tokenizer_json = weights.path / "tokenizer.json"
    if tokenizer_json.is_file():
        for entry in json.loads(tokenizer_json.read_text()).get("added_tokens", []):
            added[int(entry["id"])] = entry
    config_file = weights.path / "tokenizer_config.json"
    if config_file.is_file():
        for key, entry in json.loads(config_file.read_text()).get("added_tokens_decoder", {}).items():
            added.setdefault(int(key), entry)
    return added


def _chat_template(weights: ModelWeights) -> str | None:
    jinja = weights.path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "tokenizer_config.json", "processor_config.json"):
        file = weights.path / name
        if file.is_file():
            template = json.loads(file.read_text()).get("chat_template")
            if isinstance(template, str):
                return template
    return None


def _gguf_array(tensor, dtype: str) -> np.ndarray:
    array = tensor.float().numpy()
    # llama.cpp keeps 1-D tensors (norms, biases) in F32 whatever the file type.
    if dtype == "F16" and array.ndim > 1:
        array = array.astype(np.float16)
    return array


def write_language_gguf(weights: ModelWeights, out: str | Path, dtype: str = "F32") -> Path:
    """Write the model's language model to ``out`` as an F32 or F16 GGUF."""
    import gguf
    import torch

    if dtype not in ("F32", "F16"):
        raise ValueError(f"write_language_gguf writes F32 or F16, not {dtype}")
    out = Path(out)
    text = weights.text_config
    n_layers = text.num_hidden_layers
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PADDLEOCR, n_layers)
    tokens, scores, types, normalizer = _vocabulary(weights, text.vocab_size)

    writer = gguf.GGUFWriter(str(out), ARCH)
    writer.add_name(weights.path.name)
    writer.add_file_type(QUANT_FTYPES[dtype])
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(text.num_attention_heads)
    writer.add_head_count_kv(text.num_key_value_heads)
    writer.add_key_length(text.head_dim)
    writer.add_value_length(text.head_dim)
    writer.add_rope_dimension_count(text.head_dim)
    writer.add_rope_freq_base(weights.rope_theta)
    writer.add_rope_dimension_sections(weights.mrope_section + [0] * (4 - len(weights.mrope_section)))
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(bool(normalizer.add_dummy_prefix))
    writer.add_remove_extra_whitespaces(bool(normalizer.remove_extra_whitespaces))
    for setter, token_id in (
        (writer.add_bos_token_id, text.bos_token_id),
        (writer.add_unk_token_id, 0),
        (writer.add_pad_token_id, text.pad_token_id),
    ):
        if token_id is not None:
            setter(int(token_id))
    eos = weights.eos_token_ids
    if eos:
        writer.add_eos_token_id(int(eos[0]))
    writer.add_add_bos_token(False)  # the chat template writes <|begin_of_sentence|> itself
    writer.add_add_eos_token(False)
    template = _chat_template(weights)
    if template:
        writer.add_chat_template(template)

    # Tying is decided from the tensors, not the config: PaddlePaddle's flat release config
    # says tie_word_embeddings false, transformers' config class parses it as tied, and
    # transformers' model still projects with the stored lm_head when it differs from the
    # embeddings. llama.cpp falls back to the embeddings when output.weight is absent.
    embeddings = lm_head = None
    for name, tensor in weights.tensors((LANGUAGE_PREFIX, LM_HEAD)):
        if name == LM_HEAD:
            lm_head = tensor
            continue
        if name == LANGUAGE_PREFIX + "embed_tokens.weight":
            embeddings = tensor
        hf_name = "model." + name[len(LANGUAGE_PREFIX):]
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"{weights.path}: language-model weight {name} has no GGUF equivalent")
        writer.add_tensor(gguf_name, _gguf_array(tensor, dtype))
    if embeddings is None:
        raise ModelError(f"{weights.path}: no language-model weights found")
    if lm_head is not None and not torch.equal(lm_head, embeddings):
        writer.add_tensor(name_map.get_name(LM_HEAD, try_suffixes=(".weight",)), _gguf_array(lm_head, dtype))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def quantize_gguf(source: str | Path, target: str | Path, quant: str) -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer (no llama.cpp checkout needed)."""
    from ..machine.llama_runtime import captured_stderr, llama_cpp_module

    llama_cpp = llama_cpp_module()
    if quant not in QUANT_FTYPES:
        raise ModelError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant]
    params.nthread = os.cpu_count() or 1
    params.allow_requantize = True
    with captured_stderr() as output:
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(target).encode(), ctypes.byref(params)
        )
        if status != 0:
            lines = [line for line in output().splitlines() if line.strip()]
            detail = lines[-1].strip() if lines else f"status {status}"
            raise ModelError(f"{source}: quantizing to {quant} failed ({detail})")
    return Path(target)


def _weights_key(weights: ModelWeights, cache: Path) -> str:
    """Content hash of a model, remembered by file size and mtime so re-runs skip hashing."""
    index_file = cache / "model-hashes.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError):
        index = {}
    stamp = "|".join(
        f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(weights.path.iterdir()) if f.is_file()
    )
    key = str(weights.path.resolve())
    if index.get(key, {}).get("stamp") == stamp:
        return index[key]["sha256"]
    digest = weights.content_hash()
    index[key] = {"stamp": stamp, "sha256": digest}
    tmp = index_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(index_file)
    return digest


def convert(
    model: str | Path,
    quant: str = "Q4_K_M",
    out: str | Path | None = None,
    cache: str | Path | None = None,
) -> Path:
    """Return a GGUF of ``model``'s language model at ``quant``, converting only when needed.

    ``model`` is a model folder, a Hub id or an existing GGUF. Without
    ``out`` the result lives in the cache; with it, the result is also copied there.
    """
    quant = quant.upper()
    if quant not in QUANT_FTYPES:
        raise ModelError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")
    cache_root = cache_dir(cache)
    gguf_root = cache_root / "gguf"
    gguf_root.mkdir(exist_ok=True)

    if str(model).endswith(".gguf"):
        info = inspect_gguf(model)
        if info.quant == quant:
            result = info.path
        else:
            digest = hashlib.sha256(f"{info.path.resolve()}:{info.path.stat().st_mtime_ns}".encode()).hexdigest()
            result = gguf_root / f"{info.path.stem}-{digest[:12]}-{quant}.gguf"
            if not result.exists():
                _atomic(result, lambda tmp: quantize_gguf(info.path, tmp, quant))
    else:
        weights = ModelWeights.open(model)
        key = hashlib.sha256(
            f"{_weights_key(weights, cache_root)}:{quant}:{CONVERTER_VERSION}".encode()
        ).hexdigest()[:16]
        stem = re.sub(r"[^\w.-]+", "_", weights.path.name) or "model"
        result = gguf_root / f"{stem}-{key}-{quant}.gguf"
        if not result.exists():
            if quant in ("F32", "F16"):
                _atomic(result, lambda tmp: write_language_gguf(weights, tmp, quant))
            else:
                base = convert(weights.path, "F32", cache=cache_root)
                _atomic(result, lambda tmp: quantize_gguf(base, tmp, quant))
        inspect_gguf(result)

    if out is not None:
        out = Path(out)
        if out.resolve() != result.resolve():
            import shutil

            _atomic(out, lambda tmp: shutil.copyfile(result, tmp))
        return out
    return result


def _atomic(target: Path, write) -> None:
    """Run ``write(tmp)`` and move the file into place, so a killed run leaves no half file."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
