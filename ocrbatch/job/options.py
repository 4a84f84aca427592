"""What ``ocrbatch run`` can be told, with its defaults: the one place they are set.

The command line reads its option defaults from :class:`JobOptions`, so a
default changed here changes ``--help``, the CLI and the Python API together.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from ..engines.ray_files import DEFAULT_NODE_CACHE
from ..layout.blocks import recognised_pictures
from ..model.prompt import TASK_PROMPTS
from ..records.sqlite import checkpoint_path_for
from ..sources.video import DEFAULT_VIDEO_FPS
from ..storage import ObjectPath

# A page's decode may take this long before it is failed: a fixed allowance for
# prefill and waiting behind other pages on the worker, plus time per token far
# slower than any CPU decodes (about 2 tokens/s per sequence).
PAGE_TIMEOUT_BASE_S = 300.0
PAGE_TIMEOUT_PER_TOKEN_S = 0.5
BACKENDS = ("local", "openai")


class OptionError(ValueError):
    """Options that do not go together; ``option`` names the one to change (``--layout-model``)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


@dataclass
class JobOptions:
    """Everything ``ocrbatch run`` can be told; defaults suit a small CPU machine."""

    paths: list[Path | ObjectPath]  # an ObjectPath for an s3:// (gs://, az://, ...) URL: see ocrbatch.storage
    out: Path | ObjectPath
    output_format: str | None = None
    checkpoint: Path | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    retry_failed: bool = False
    max_retries: int = 2
    max_page_error_rate: float = 0.5
    min_file_age: float = 5.0
    model: str = "PaddlePaddle/PaddleOCR-VL"
    quant: str = "Q4_K_M"
    gguf: str | None = None
    task: str = "ocr"
    layout: str = "cdla"  # cdla, pp-doclayout, none: see ocrbatch.layout.detect
    layout_model: str | None = None  # PP-DocLayout weights for --layout pp-doclayout
    charts: bool = False  # layout mode: chart blocks recognised with Chart Recognition: (else kept as pictures)
    seals: bool = False  # layout mode: seal blocks recognised with Seal Recognition: (1.5+; else pictures)
    stitch: bool = True  # layout mode: pieces of text recognised as one image (see ocrbatch.layout.stitch)
    pdf_text: str = "never"  # never, auto, only: see ocrbatch.sources.textlayer
    trust_ocr_layer: bool = False
    max_tokens: int = 1024
    backend: str = "local"  # local (this machine's models) or openai (a server: see ocrbatch.backends.remote)
    base_url: str | None = None
    api_key: str | None = None
    remote_model: str | None = None  # None: the first model the server lists
    concurrency: int = 4  # requests in flight to the server
    page_timeout: float | None = None  # None: page_timeout_for(max_tokens)
    stop_grace: float = 20.0
    workers: int = 1
    seqs_per_worker: int = 4
    dpi: float = 150
    max_pixels: int | None = None
    video_fps: float = DEFAULT_VIDEO_FPS  # frames sampled per second of a video (see ocrbatch.sources.video)
    batch_size: int = 4
    # About one page a forward pass: a page goes to decoding when its pass ends, so on a CPU passes
    # of one page started decoding 2-4x sooner, ran 1.07-1.17x faster and peaked 12-20 % lower than
    # four-page passes (README, "Decoding while encoding"). GPUs want larger ones (configs/gpu.toml).
    max_batch_patches: int = 6144
    vision_dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    cache_dir: str | None = None
    markdown_dir: Path | None = None
    progress: bool = True
    ignore_eos: bool = False  # decode exactly max_tokens per page: for benchmarks
    flush_rows: int = 32
    flush_seconds: float = 10.0

    @property
    def checkpoint_path(self) -> Path:
        """``--checkpoint``, else beside a local ``--out``, else in this machine's folder for an object ``--out``."""
        return self.checkpoint or checkpoint_path_for(self.out)

    def validate(self, engine: str = "local") -> None:
        """Raise :class:`OptionError` for options that do not go together (for ``engine``: local or ray)."""
        if self.layout_model and self.layout != "pp-doclayout":
            raise OptionError("--layout-model", "applies to --layout pp-doclayout only")
        if self.pdf_text != "never" and self.task != "ocr":
            raise OptionError("--pdf-text", f"the text layer stands in for OCR only, not task {self.task!r}")
        if self.task == "spotting" and self.layout != "none":  # layout blocks take their labels' prompts
            raise OptionError("--task", "spotting reads whole pages, as PaddleX does: add --layout none")
        if engine == "ray":
            if self.video_fps != DEFAULT_VIDEO_FPS:
                raise OptionError("--video-fps", f"the ray engine samples videos at {DEFAULT_VIDEO_FPS:g} frame/s; "
                                  "--video-fps is for the local engine")
        elif isinstance(self.out, Path) and self.out.is_dir():
            raise OptionError("--out", f"{self.out} is a folder; the local engine writes one file")
        if self.backend == "openai" and not self.base_url:
            raise OptionError("--base-url", "--backend openai needs the server's address")

    def record_settings(self, model_name: str, quant: str) -> dict[str, str]:
        """What a job's record (checkpoint or dataset) holds it to: a run with any other value is refused,
        since its pages would not read as the recorded ones do."""
        settings = {"task": self.task, "model": model_name, "quant": quant, "max_tokens": str(self.max_tokens),
                    "backend": self.backend, "prompt": TASK_PROMPTS[self.task], "layout": self.layout,
                    "layout_model": self.layout_model or "",
                    # A video's page numbers are its kept frames at this rate.
                    "video_fps": f"{self.video_fps:g}"}
        if self.layout != "none":  # blocks merged or not, pictures read or not: other model calls, other text
            settings["stitch"] = "on" if self.stitch else "off"
            settings["recognised_pictures"] = ",".join(sorted(self.recognised_pictures)) or "none"
        return settings

    @property
    def recognised_pictures(self) -> frozenset[str]:
        """The picture labels whose blocks go to the model (``--charts``, ``--seals``)."""
        return recognised_pictures(self.charts, self.seals)

    @property
    def max_in_flight(self) -> int:
        """Units handed to the decoder and not yet back: every worker's sequences and one waiting each, and a batch."""
        return self.workers * (self.seqs_per_worker + 1) + self.batch_size

    @property
    def effective_page_timeout(self) -> float:
        return self.page_timeout if self.page_timeout is not None else page_timeout_for(self.max_tokens)


def page_timeout_for(max_tokens: int) -> float:
    """The default ``--page-timeout`` for pages of up to ``max_tokens`` tokens."""
    return PAGE_TIMEOUT_BASE_S + PAGE_TIMEOUT_PER_TOKEN_S * max_tokens


@dataclass
class RaySettings:
    """How the job is laid out on Ray; ``None`` fields follow the job's options."""

    vision_actors: int = 1
    vision_cpus: float = 1.0
    vision_gpus: float = 0.0
    decode_actors: int | None = None  # default: --workers
    decode_cpus: float = 1.0
    seqs_per_actor: int | None = None  # default: --seqs-per-worker
    # A local instance only: logical CPUs (default: every actor's plus one, at least the cores)
    # and object-store bytes (default: see default_object_store_bytes).
    num_cpus: int | None = None
    object_store_memory: int | None = None
    runtime_env: dict | None = None  # the job's Ray runtime environment (env vars, setup hooks)
    # How long a pool may take to start all its actors: past it, the run fails with Ray's
    # "not enough resources" error instead of waiting forever for CPUs the cluster lacks.
    actor_start_timeout_s: int = 600
    # Where each node keeps its copy of the model files when it does not see the driver's.
    node_cache: str = str(DEFAULT_NODE_CACHE)
    # Copy the model files to every node even where the driver's paths show them (a file system
    # that changes modification times, say); the copy is made once per node and files.
    always_copy_models: bool = False


def default(name: str, of: type = JobOptions):
    """The default of the field ``name`` of the options class ``of`` (:class:`JobOptions`, :class:`RaySettings`)."""
    for option in fields(of):
        if option.name == name:
            if option.default is MISSING:
                raise KeyError(f"{name} has no default")
            return option.default
    raise KeyError(name)
