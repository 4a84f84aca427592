"""``--engine ray``: the batch job as Ray Data operations, on one machine or a cluster.

The driver discovers the documents and plans the pages against the Parquet
dataset in ``--out DIR`` (:mod:`ocrbatch.dataset_record`: the dataset is the
record, there is no checkpoint database), converts the GGUF once, and streams
a manifest of pages ``(doc_id, path, page, page_count)`` through two actor pools:

1. :class:`VisionStage` actors render their pages and run the vision encoder
   (torch threads = the actor's CPUs; GPUs when asked for), emitting each
   page's language-model request;
2. :class:`DecodeStage` actors each hold one :class:`LanguageModel` and decode
   a batch of pages several sequences at a time (llama.cpp threads = the
   actor's CPUs), emitting output rows.

Rows come back to the driver as they finish and are written to ``DIR`` as
whole files (see :class:`_Sink`), so a run killed at any moment loses only
the pages it had not written, and the next run does just those.

Failures: anything that goes wrong with one page (a bad file, the encoder, a
request llama.cpp refuses) is caught in the stage and becomes a ``failed``
row, because Ray Data would otherwise fail the whole job on one errored
block. An actor that dies (a llama.cpp abort, out of memory, killed) has its
tasks retried by Ray on a restarted actor, ``max_retries`` times; a block that
still fails is dropped (``max_errored_blocks``), and its pages, found missing
at the end, are run once more one page per task and one task per actor, so
that a page that kills actors does not take its batch-mates down with it. A
page that still does not come back is a failed row.

Every node must see the documents, the checkpoint and the GGUF cache at the
same paths (a shared file system): paths are made absolute by the driver, and
the actors read the GGUF the driver converted.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa

from .assemble import Unit
from .dataset_record import DatasetRecord, best_entries, new_run_id
from .discover import Document, discover
from .encode import encode_units
from .errors import InputError, OcrbatchError
from .output import SCHEMA
from .pipeline import JobSummary
from .rasterize import PageImage, count_pages, iter_pages

log = logging.getLogger("ocrbatch")

RAY_MISSING = "the ray engine needs Ray: pip install 'ocrbatch[ray]' (or pip install 'ray[data]')"
# What the vision stage hands the decode stage: the page, and its request or why there is none.
ENCODED_SCHEMA = pa.schema([
    ("path", pa.string()), ("doc_id", pa.string()), ("page", pa.int32()), ("page_count", pa.int32()),
    ("error", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("n_image_tokens", pa.int32()),
    ("render_s", pa.float64()), ("vision_s", pa.float64()),
    ("request", pa.large_binary()),  # a pickled GenerationRequest (prompt layout and embeddings)
    ("vision_node", pa.string()),
])
# Output rows plus what they do not keep: the generated ids and the Ray node of each stage.
DEBUG_FIELDS = [("token_ids", pa.list_(pa.int32())), ("vision_node", pa.string()), ("decode_node", pa.string())]
DECODED_SCHEMA = pa.schema([*SCHEMA, *DEBUG_FIELDS])


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


@dataclass
class StageConfig:
    """What every stage actor needs, sent to it once when it starts."""

    checkpoint: str
    gguf: str
    model_name: str
    quant: str
    task: str
    max_tokens: int
    ignore_eos: bool
    dpi: float
    max_pixels: int | None
    vision_dtype: str
    vision_device: str
    vision_threads: int
    decode_threads: int
    seqs: int


@dataclass
class RayPlan:
    """The pages a run processes, and what it does not."""

    manifest: list[dict] = field(default_factory=list)  # {"path", "doc_id", "page", "page_count"}
    unreadable: list[tuple[Document, str]] = field(default_factory=list)
    skipped: int = 0
    documents: int = 0
    deferred: int = 0  # files still being written (--min-file-age), left for a later run


@dataclass
class RayJobSummary(JobSummary):
    """The local engine's summary plus where the pages ran: ``nodes[stage][node_id]`` = pages."""

    nodes: dict[str, Counter] = field(default_factory=lambda: {"vision": Counter(), "decode": Counter()})
    lost_pages: int = 0  # pages whose actors died, run again one page per task


# -- per-page work, free of Ray --------------------------------------------------------


def failure_row(path: str, doc_id: str, page: int, page_count: int, error: str, task: str, model: str,
                quant: str) -> dict:
    """The output row of a page (or, as page 0, a document) that failed."""
    return {"path": path, "doc_id": doc_id, "page": page, "page_count": page_count, "task": task, "text": "",
            "status": "failed", "error": error, "model": model, "quant": quant,
            "created_at": datetime.now(timezone.utc)}


def render_pages(items: list[dict], dpi: float, max_pixels: int) -> list[PageImage]:
    """Render manifest items, opening each document once; a page that cannot be rendered carries ``error``."""
    rendered = []
    by_document: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for item in items:
        by_document[(item["path"], item["doc_id"])].append(item)
    for (path, doc_id), pages in by_document.items():
        document = Document(Path(path), doc_id)
        numbers = [item["page"] for item in pages]
        try:
            rendered.extend(iter_pages(document, numbers, dpi, max_pixels))
        except Exception as exc:  # the document will not open now: each of its pages fails alone
            reason = str(exc) if isinstance(exc, InputError) else f"{path}: cannot render ({type(exc).__name__}: {exc})"
            done = {page.page for page in rendered if page.document.path == document.path}
            rendered.extend(PageImage(document, item["page"], item["page_count"], error=reason)
                            for item in pages if item["page"] not in done)
    return rendered


def encode_pages(vision, pages: list[PageImage]) -> list[tuple[PageImage, object, float, str | None]]:
    """``(page, embeddings, vision seconds, error)`` per page, by the encode stage of the local engine."""
    units = [Unit(None, page.image, "", None) for page in pages]
    return [(page, result.encoded, result.vision_s,
             f"{page.document.path} page {page.page}: {result.error}" if result.error else None)
            for page, result in zip(pages, encode_units(vision, units, max_batch_patches=1 << 62))]


def generate_each(model, requests: list) -> list:
    """Decode ``requests`` together; each result is a ``GenerationResult`` or the reason it failed.

    ``LanguageModel.generate`` fails a request it refuses on its own; if it
    raises, the requests are run one by one so only the culprit fails.
    """
    try:
        return model.generate(requests)
    except Exception as exc:
        if len(requests) == 1:
            return [f"language model failed ({type(exc).__name__}: {exc})"]
        return [result for request in requests for result in generate_each(model, [request])]


def context_size(checkpoint, n_seq: int, max_tokens: int) -> int:
    """KV cells for ``n_seq`` pages of the largest image plus ``max_tokens`` (as :meth:`Engine.context_size`)."""
    from transformers import AutoImageProcessor

    from .engine import PROMPT_TEXT_ALLOWANCE

    processor = AutoImageProcessor.from_pretrained(checkpoint.path)
    unit = (processor.patch_size * checkpoint.config.vision_config.spatial_merge_size) ** 2
    return n_seq * (processor.size.longest_edge // unit + PROMPT_TEXT_ALLOWANCE + max_tokens)


# -- the Ray stages --------------------------------------------------------------------


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class VisionStage:
    """Ray actor: render pages and encode them; one batch of manifest rows in, requests out."""

    def __init__(self, config: StageConfig):
        from .engine import Engine

        self.config = config
        self.engine = Engine(config.checkpoint, quant=config.quant, gguf=config.gguf,
                             vision_dtype=config.vision_dtype, device=config.vision_device,
                             max_tokens=config.max_tokens, threads=config.vision_threads, with_language=False)
        self.text = self.engine.prompt_text(config.task)
        longest = self.engine.vision.image_processor.size.longest_edge
        self.max_pixels = min(config.max_pixels or longest, longest)
        self.node = _node_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        pages = render_pages(batch.to_pylist(), self.config.dpi, self.max_pixels)
        for page in pages:
            if page.error:
                out.append(self._row(page, error=page.error))
        for page, encoded, vision_s, error in encode_pages(self.engine.vision, [p for p in pages if not p.error]):
            if error:
                out.append(self._row(page, error=error))
                continue
            request = self.engine.request(encoded, self.text, self.config.max_tokens)
            if self.config.ignore_eos:
                request.stop_ids = ()
            width, height = page.image.size
            out.append(self._row(page, width=width, height=height, n_image_tokens=encoded.n_tokens,
                                 render_s=page.render_s, vision_s=vision_s,
                                 request=pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)))
        return pa.Table.from_pylist(out, schema=ENCODED_SCHEMA)

    def _row(self, page: PageImage, **values) -> dict:
        return {"path": str(page.document.path), "doc_id": page.document.doc_id, "page": page.page,
                "page_count": page.page_count, "vision_node": self.node, **values}


class DecodeStage:
    """Ray actor: one llama.cpp context decoding several pages at once; requests in, output rows out."""

    def __init__(self, config: StageConfig):
        from .checkpoint import Checkpoint
        from .language import LanguageModel
        from .prompt import PromptBuilder

        self.config = config
        checkpoint = Checkpoint.open(config.checkpoint)
        self.prompts = PromptBuilder(checkpoint.path, checkpoint.config.image_token_id,
                                     checkpoint.config.vision_config.spatial_merge_size)
        self.model = LanguageModel(config.gguf, n_ctx=context_size(checkpoint, config.seqs, config.max_tokens),
                                   n_seq_max=config.seqs, n_threads=config.decode_threads)
        self.node = _node_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(decode_rows(self, batch.to_pylist()), schema=DECODED_SCHEMA)


def decode_rows(stage: DecodeStage, rows: list[dict]) -> list[dict]:
    """Output rows for a batch of encoded pages: decoded, or failed with the reason."""
    config = stage.config
    labels = (config.task, config.model_name, config.quant)
    out = []
    ready = []
    for row in rows:
        if row["error"]:
            out.append({**failure_row(row["path"], row["doc_id"], row["page"], row["page_count"], row["error"],
                                      *labels), "vision_node": row["vision_node"], "decode_node": stage.node})
        else:
            ready.append(row)
    requests = [pickle.loads(row["request"]) for row in ready]
    for row, result in zip(ready, generate_each(stage.model, requests)):
        base = {"vision_node": row["vision_node"], "decode_node": stage.node}
        error = result if isinstance(result, str) else result.error
        if error:
            out.append({**failure_row(row["path"], row["doc_id"], row["page"], row["page_count"],
                                      f"{row['path']} page {row['page']}: {error}", *labels), **base})
            continue
        out.append({
            "path": row["path"], "doc_id": row["doc_id"], "page": row["page"], "page_count": row["page_count"],
            "task": config.task, "text": stage.prompts.decode(result.token_ids), "status": "ok", "error": None,
            "n_image_tokens": row["n_image_tokens"], "n_output_tokens": len(result.token_ids),
            "finish_reason": result.finish_reason, "width": row["width"], "height": row["height"],
            "model": config.model_name, "quant": config.quant, "render_s": row["render_s"],
            "vision_s": row["vision_s"], "prefill_s": result.prefill_s, "decode_s": result.decode_s,
            "created_at": datetime.now(timezone.utc), "token_ids": result.token_ids, **base,
        })
    return out


# -- the driver ------------------------------------------------------------------------


def import_ray():
    """The ``ray`` module with Ray Data, or an :class:`OcrbatchError` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is an extra of ray)
    except ImportError:
        raise OcrbatchError(RAY_MISSING) from None
    return ray


def plan_pages(options, record: DatasetRecord, dry_run: bool = False) -> RayPlan:
    """Discover the documents, bring ``record`` in line with them, and list the pages still to do.

    A content id is processed once, under the first path found; see
    :meth:`DatasetRecord.reconcile` for moved, edited and retried documents.
    ``dry_run`` plans the same pages and changes nothing.
    """
    documents: dict[str, Document] = {}
    deferred = 0
    for document in discover([Path(p).absolute() for p in options.paths], options.include, options.exclude,
                             min_file_age=options.min_file_age):
        if document.deferred:
            log.info("%s: %s; left for a later run", document.path, document.deferred)
            deferred += 1
            continue
        documents.setdefault(document.doc_id, document)
    retry = set(documents) if options.retry_failed else set()
    changes, remaining = record.reconcile({doc_id: str(d.path) for doc_id, d in documents.items()}, retry,
                                          apply=not dry_run)
    if changes and not dry_run:
        log.info("dataset brought up to date: %s", ", ".join(f"{n} rows {what}" for what, n in changes.items()))
    done: dict[str, dict[int, int | None]] = defaultdict(dict)
    for (doc_id, page), entry in best_entries(remaining).items():
        done[doc_id][page] = entry.page_count
    plan = RayPlan(deferred=deferred)
    for doc_id, document in documents.items():
        finished = done.get(doc_id, {})
        if 0 in finished:  # could not be opened last time; --retry-failed removed that row
            plan.skipped += 1
            continue
        if document.error:
            plan.unreadable.append((document, document.error))
            continue
        page_count = next((count for count in finished.values() if count), None)
        if page_count is None:
            try:
                page_count = count_pages(document)
            except InputError as exc:
                plan.unreadable.append((document, str(exc)))
                continue
            except Exception as exc:  # whatever a file does to the planner, it fails alone
                plan.unreadable.append((document, f"{document.path}: cannot be planned ({type(exc).__name__}: {exc})"))
                continue
        pages = [p for p in range(1, page_count + 1) if p not in finished]
        plan.skipped += page_count - len(pages)
        plan.manifest += [{"path": str(document.path), "doc_id": doc_id, "page": p, "page_count": page_count}
                          for p in pages]
    plan.documents = len({item["doc_id"] for item in plan.manifest}) + len(plan.unreadable)
    return plan


class _Sink:
    """Counts finished rows and writes them to the dataset, one whole file per flush."""

    def __init__(self, record: DatasetRecord, run_id: str, summary, rows_per_file: int, flush_seconds: float,
                 on_row: Callable[[dict], None] | None, total: int, progress: bool):
        from tqdm import tqdm

        self.record, self.run_id, self.summary = record, run_id, summary
        self.rows_per_file, self.flush_seconds, self.on_row = rows_per_file, flush_seconds, on_row
        self.buffer: list[dict] = []
        self.files = 0
        self.last_flush = time.monotonic()
        self.seen: set[tuple[str, int]] = set()
        self.progress = tqdm(total=total, unit="page", disable=None if progress else True, dynamic_ncols=True,
                             desc="ocrbatch")

    def add(self, row: dict) -> None:
        key = (row["doc_id"], row["page"])
        if key in self.seen:  # a block Ray ran twice: the first copy stands
            return
        self.seen.add(key)
        if row["status"] == "ok":
            self.summary.pages_ok += 1
        else:
            self.summary.pages_failed += 1
            log.warning("%s", row["error"])
        for stage in ("vision", "decode"):
            if row.get(f"{stage}_node"):
                self.summary.nodes[stage][row[f"{stage}_node"]] += 1
        if self.on_row is not None:
            self.on_row(row)
        self.progress.update(1)
        self.buffer.append(row)
        if len(self.buffer) >= self.rows_per_file or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.files += 1
            self.record.write(self.buffer, f"part-{self.run_id}-{self.files:05d}.parquet")
            self.buffer = []
        self.last_flush = time.monotonic()

    def close(self) -> None:
        self.progress.close()


def default_object_store_bytes() -> int:
    """A fifth of the machine's memory, between 512 MiB and 4 GiB.

    The pipeline keeps only a few batches of embeddings in flight (a few MB a
    page), so Ray's default of 30% of memory would only take shared memory
    the model processes can use better.
    """
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(max(total // 5, 512 << 20), 4 << 30))


def connect(ray, address: str | None, settings: RaySettings, cpus_needed: float) -> bool:
    """Join the cluster at ``address``, or start a fresh local instance; True when this call started Ray.

    ``address="local"`` rather than ``ray.init()``: after a killed run the
    latter attaches to the dead instance recorded in /tmp/ray. The local
    instance declares logical CPUs for every actor plus one (at least the
    machine's cores), because Ray Data stalls when its actors hold every
    declared CPU and a task of its own (reading, splitting) needs one.
    """
    if ray.is_initialized():
        return False
    if address is None:
        # Ray reports usage statistics to its makers unless told not to; documents stay private here.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        cpus = settings.num_cpus or max(os.cpu_count() or 1, math.ceil(cpus_needed) + 1)
        ray.init(address="local", num_cpus=cpus,
                 object_store_memory=settings.object_store_memory or default_object_store_bytes(),
                 include_dashboard=False, runtime_env=settings.runtime_env)
    else:
        ray.init(address=address, runtime_env=settings.runtime_env)
    return True


def _stream(ray, manifest: list[dict], config: StageConfig, settings: RaySettings, decode_actors: int,
            max_retries: int, one_page_per_task: bool, vision_batch: int) -> Iterator[dict]:
    """Run the manifest through the two actor pools and yield output rows as they finish."""
    vision_batch = 1 if one_page_per_task else vision_batch
    decode_batch = 1 if one_page_per_task else 2 * config.seqs  # a second batch's worth keeps slots busy
    vision_tasks = math.ceil(len(manifest) / vision_batch)
    # When pages run alone, an actor holds one task at a time: tasks queued on an actor die with
    # it, and would spend their retries on another page's crash.
    in_flight = 1 if one_page_per_task else None
    # No more actors than tasks: an idle actor costs its start-up and memory.
    vision_pool = ray.data.ActorPoolStrategy(size=min(settings.vision_actors, vision_tasks),
                                             max_tasks_in_flight_per_actor=in_flight)
    decode_pool = ray.data.ActorPoolStrategy(size=min(decode_actors, math.ceil(len(manifest) / decode_batch)),
                                             max_tasks_in_flight_per_actor=in_flight)
    dataset = ray.data.from_items(manifest, override_num_blocks=vision_tasks)
    remote_args = dict(max_restarts=-1, max_task_retries=max_retries, scheduling_strategy="SPREAD")
    with warnings.catch_warnings():
        # max_task_retries and scheduling_strategy are only reachable through the deprecated
        # **ray_remote_args (until Ray 2.64). Ray Data's default retries (-1, forever) would loop on a
        # page that kills every actor, and without SPREAD a pool may land on one node whole.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        dataset = dataset.map_batches(
            VisionStage, fn_constructor_args=(config,), batch_size=vision_batch, batch_format="pyarrow",
            compute=vision_pool, num_cpus=settings.vision_cpus, num_gpus=settings.vision_gpus or None, **remote_args)
        dataset = dataset.map_batches(
            DecodeStage, fn_constructor_args=(config,), batch_size=decode_batch, batch_format="pyarrow",
            compute=decode_pool, num_cpus=settings.decode_cpus, **remote_args)
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from table.to_pylist()


def _stage_config(options, settings: RaySettings, seqs: int) -> StageConfig:
    """Resolve the checkpoint and convert the GGUF once, here, for every actor to read."""
    from .checkpoint import Checkpoint
    from .gguf_convert import convert

    checkpoint = Checkpoint.open(options.model)
    quant = options.quant.upper()
    gguf = convert(options.gguf or checkpoint.path, quant, cache=options.cache_dir)
    return StageConfig(
        checkpoint=str(Path(checkpoint.path).absolute()), gguf=str(Path(gguf).absolute()),
        model_name=str(options.model), quant=quant, task=options.task, max_tokens=options.max_tokens,
        ignore_eos=options.ignore_eos, dpi=options.dpi, max_pixels=options.max_pixels,
        vision_dtype=options.vision_dtype, vision_device="cuda" if settings.vision_gpus else options.device,
        vision_threads=max(1, int(settings.vision_cpus)), decode_threads=max(1, int(settings.decode_cpus)),
        seqs=seqs)


def run_ray_job(options, address: str | None = None, settings: RaySettings | None = None,
                on_row: Callable[[dict], None] | None = None):
    """Run the batch job described by ``options`` (a :class:`JobOptions`) on Ray; returns its summary.

    ``options.out`` is the dataset folder. ``address`` joins a running
    cluster (``auto``, ``ray://host:port``, ``host:port``); without it a
    fresh local instance is started and shut down at the end. ``on_row`` sees
    every finished row with the extra fields of :data:`DEBUG_FIELDS`.
    Raises :class:`ocrbatch.pipeline.JobLocked` when another run holds the
    dataset, and :class:`OcrbatchError` for fatal problems.
    """
    ray = import_ray()
    settings = settings or RaySettings()
    started = time.monotonic()
    decode_actors = settings.decode_actors or options.workers
    seqs = settings.seqs_per_actor or options.seqs_per_worker
    record = DatasetRecord(options.out, {"task": options.task, "model": str(options.model),
                                         "quant": options.quant.upper(), "max_tokens": str(options.max_tokens)})
    summary = RayJobSummary()
    with record.lock():
        record.check_settings()
        repaired = record.recover()
        if repaired:
            log.info("%s: removed %d duplicate rows left by an interrupted run", options.out, repaired)
        plan = plan_pages(options, record)
        summary.pages_skipped, summary.documents, summary.deferred_files = plan.skipped, plan.documents, plan.deferred
        log.info("%d pages to process in %d documents (%d unreadable), %d already done",
                 len(plan.manifest), plan.documents, len(plan.unreadable), plan.skipped)
        config = _stage_config(options, settings, seqs) if plan.manifest else None
        run_id = new_run_id()
        sink = _Sink(record, run_id, summary, options.flush_rows, options.flush_seconds, on_row,
                     len(plan.manifest) + len(plan.unreadable), options.progress)
        try:
            for document, error in plan.unreadable:
                sink.add(failure_row(str(document.path), document.doc_id, 0, 0, error, options.task,
                                     str(options.model), options.quant.upper()))
            if plan.manifest:
                _process(ray, plan.manifest, config, settings, options, address, decode_actors, sink)
        finally:
            sink.flush()
            sink.close()
        record.compact(run_id)
    summary.elapsed_s = time.monotonic() - started
    return summary


def _process(ray, manifest: list[dict], config: StageConfig, settings: RaySettings, options, address,
             decode_actors: int, sink: _Sink) -> None:
    cpus = settings.vision_actors * settings.vision_cpus + decode_actors * settings.decode_cpus
    started_ray = connect(ray, address, settings, cpus)
    try:
        context = ray.data.DataContext.get_current()
        context.max_errored_blocks = -1  # an errored block's pages come back missing and are redone below
        context.enable_progress_bars = False  # the job's own bar counts pages
        # Every actor of a pool is up before work starts, so work is spread over all of them
        # rather than the first one ready; this also turns a pool the cluster cannot place into an error.
        context.wait_for_min_actors_s = settings.actor_start_timeout_s
        run = dict(config=config, settings=settings, decode_actors=decode_actors, max_retries=options.max_retries,
                   vision_batch=options.batch_size)
        for row in _stream(ray, manifest, one_page_per_task=False, **run):
            sink.add(row)
        missing = [item for item in manifest if (item["doc_id"], item["page"]) not in sink.seen]
        if missing:
            sink.summary.lost_pages = len(missing)
            log.warning("%d pages were lost with Ray actors that died; trying them one page per task", len(missing))
            for row in _stream(ray, missing, one_page_per_task=True, **run):
                sink.add(row)
        for item in manifest:
            if (item["doc_id"], item["page"]) not in sink.seen:
                sink.add(failure_row(
                    item["path"], item["doc_id"], item["page"], item["page_count"],
                    f"{item['path']} page {item['page']}: lost with its Ray actor, also when run alone with "
                    f"{options.max_retries} retries (the actor died: a crash in rendering, the vision encoder or "
                    "llama.cpp, or out of memory; or an error in the Ray logs)", config.task, config.model_name,
                    config.quant))
    except ray.exceptions.RayError as exc:
        # An actor that cannot start (a bad device, too little memory) fails the pool, and so the run.
        raise OcrbatchError(f"the Ray job failed: {str(exc).strip().splitlines()[-1]}") from exc
    finally:
        if started_ray:
            ray.shutdown()

