"""The ``ocrbatch`` command line. Commands are thin: the work is in importable modules."""

from __future__ import annotations

import json
import os
import sys

import click

from .errors import OcrbatchError
from .gguf_convert import QUANTS
from .prompt import TASKS

DEFAULT_MODEL = "PaddlePaddle/PaddleOCR-VL"


class _Group(click.Group):
    """Reports :class:`OcrbatchError` as one line on stderr with exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OcrbatchError as exc:
            raise click.ClickException(str(exc)) from None


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", module="transformers")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def model_options(function):
    """Options shared by every command that loads the engine."""
    options = [
        click.option("--model", "-m", default=lambda: os.environ.get("OCRBATCH_MODEL", DEFAULT_MODEL),
                      show_default=f"$OCRBATCH_MODEL or {DEFAULT_MODEL}",
                      help="Checkpoint folder or Hugging Face id."),
        click.option("--quant", "-q", type=click.Choice(QUANTS, case_sensitive=False), default="Q4_K_M",
                     show_default=True, help="Language-model GGUF type."),
        click.option("--gguf", type=click.Path(dir_okay=False),
                     help="Use this language-model GGUF (e.g. an official build) instead of converting."),
        click.option("--vision-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
                     show_default=True, help="Vision encoder precision."),
        click.option("--device", default="cpu", show_default=True, help="Vision encoder device (cpu, cuda)."),
        click.option("--threads", type=int, help="CPU threads for PyTorch and llama.cpp (default: all)."),
        click.option("--cache-dir", type=click.Path(file_okay=False),
                     help="Where converted GGUFs are kept [default: $OCRBATCH_CACHE_DIR or ~/.cache/ocrbatch]."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.group(cls=_Group)
@click.version_option(package_name="ocrbatch")
def main():
    """Batch document OCR with PaddleOCR-VL: vision in PyTorch, language model in llama.cpp."""
    _quiet_libraries()


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@model_options
@click.option("--task", "-t", type=click.Choice(TASKS), default="ocr", show_default=True, help="Recognition task.")
@click.option("--prompt", help="Free-form prompt text instead of a task.")
@click.option("--max-tokens", type=click.IntRange(1), default=1024, show_default=True,
              help="Most tokens generated per image.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image.")
def ocr(images, model, quant, gguf, vision_dtype, device, threads, cache_dir, task, prompt, max_tokens, as_json):
    """OCR IMAGES one by one and print the text (exit 1 if any image failed)."""
    from .engine import Engine

    engine = Engine(model=model, quant=quant, gguf=gguf, vision_dtype=vision_dtype, device=device,
                    max_tokens=max_tokens, threads=threads, cache_dir=cache_dir)
    engine.prompt_text(task, prompt)  # an unsupported task fails before any work
    failed = 0
    for image in images:
        [result] = engine.ocr([image], task=task, prompt=prompt, max_tokens=max_tokens)
        if result.error:
            failed += 1
            click.echo(f"Error: {result.error}", err=True)
        if as_json:
            click.echo(json.dumps({**result.to_dict(), "model": engine.model_name, "quant": engine.quant},
                                  ensure_ascii=False))
        elif result.ok:
            click.echo(f"== {image} ==\n{result.text}")
    sys.exit(1 if failed else 0)


@main.command()
@click.argument("model")
@click.option("--quant", "-q", type=click.Choice(QUANTS, case_sensitive=False), default="Q4_K_M",
              show_default=True, help="GGUF type to write.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Also copy the GGUF here.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Where converted GGUFs are kept [default: $OCRBATCH_CACHE_DIR or ~/.cache/ocrbatch].")
def convert(model, quant, out, cache_dir):
    """Convert MODEL's language model to GGUF and print the file's path.

    MODEL is a checkpoint folder, a Hugging Face id, or a GGUF to re-quantize.
    Results are cached, so converting the same checkpoint again is instant.
    """
    from .gguf_convert import convert as convert_model

    click.echo(convert_model(model, quant.upper(), out=out, cache=cache_dir))


@main.group()
def dev():
    """Tools for developing ocrbatch: test checkpoints and benchmarks."""


@dev.command("make-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--size", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True,
              help="tiny: seconds to run, for tests; full: the real 0.9B dimensions, for benchmarks.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, byte-identical weights.")
@click.option("--version", "model_version", type=click.Choice(["1.0", "1.5"]), default="1.0", show_default=True,
              help="Which chat template to write (1.5 adds the seal and spotting tasks).")
def make_model(directory, size, seed, model_version):
    """Write a random-weight PaddleOCR-VL checkpoint to DIRECTORY."""
    from .devmodel import make_model as make

    click.echo(make(directory, size=size, seed=seed, version=model_version))


@dev.command("make-samples")
@click.argument("directory", type=click.Path(file_okay=False), default="sample_docs")
def make_samples(directory):
    """Write the small sample documents (PDFs and a scanned-looking PNG) to DIRECTORY."""
    from .samples import make_samples as make

    for path in make(directory):
        click.echo(path)
