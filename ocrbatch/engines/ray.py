"""``--engine ray``: the batch job as Ray Data operations, on one machine or a cluster.

The driver discovers the documents and plans the pages against the Parquet
dataset in ``--out DIR`` (:mod:`ocrbatch.records.dataset`: the dataset is the
record, there is no checkpoint database), converts the GGUF once, and streams
a manifest of pages ``(doc_id, path, page, page_count)`` through two actor pools
that drive the local engine's page flow (:mod:`ocrbatch.job.flow`):

1. :class:`VisionStage` actors render their pages in the local engine's
   render process (:mod:`ocrbatch.job.render`: text layers by ``--pdf-text``,
   layout blocks by ``--layout``), start and encode them in the page flow
   (torch threads = the actor's CPUs, GPUs when asked for), yielding each
   page's language-model requests as soon as its last unit is encoded (not
   after the whole vision batch), or the finished row of a page that needs
   no decoding (failed, read from its text layer, nothing to recognise);
2. :class:`DecodeStage` actors each hold one :class:`LanguageModel` behind a
   :class:`~ocrbatch.model.language.DecodeThread` and take one page per call,
   several calls at once, so a page that arrives joins the sequences already
   decoding between steps (llama.cpp threads = the actor's CPUs); settling
   each unit in the page flow gives each page's output row.

Rows come back to the driver as they finish and are written to ``DIR`` as
whole files (:class:`~ocrbatch.records.dataset.DatasetRecorder`), so a run
killed at any moment loses only the pages it had not written, and the next
run does just those.

Failures: anything that goes wrong with one page (a bad file, layout
analysis, the encoder, a unit llama.cpp refuses) is caught in the stage and
becomes a ``failed`` row, because Ray Data would otherwise fail the whole job
on one errored block; a renderer crash is the render stage's to quarantine,
as in the local engine. An actor that dies (a llama.cpp abort, out of memory,
killed) has its tasks retried by Ray on a restarted actor, ``max_retries``
times; a block that still fails is dropped (``max_errored_blocks``), and its
pages, found missing at the end, are run once more one page per task and one
task per actor, so that a page that kills actors does not take its
batch-mates down with it. A page that still does not come back is a failed row.

With ``--backend openai`` there is one pool instead of two, and no model
here: :class:`RemoteStage` actors render their pages as the vision actors do
and send each unit to the OpenAI-compatible server through the local
engine's remote backend (:class:`~ocrbatch.backends.remote.RemoteDecoder`,
``--concurrency`` requests in flight per actor, sized within the server's
pixel bounds, each block with its loop guard), settling the answers in the
page flow into output rows. The driver checks the server once before
anything is planned: one it cannot reach stops the run (exit 3) with every
page left to do, as in the local engine; a unit the server fails fails its
page alone.

Model files: the driver resolves the model folder and converts the GGUF;
an actor on a node that does not see them at the driver's paths copies them
once per node from a file server on the driver's node (:mod:`ocrbatch.engines.ray_files`).
Rows come back to the driver, which writes the dataset, so the actors need no
path of the output either. Documents are read by the vision actors from their
paths, absolute on the driver: a shared file system or object storage.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import queue
import threading
import time
import warnings
from collections import Counter, defaultdict
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa

from ..backends.local import LocalDecoder, decoded
from ..backends.remote import RemoteDecoder, RemoteRecognizer
from ..errors import OcrbatchError
from ..job import plan as planner
from ..job.flow import FinishedPage, PageFlow, UnitsInFlight
from ..job.options import RaySettings
from ..job.render import LayoutSettings, RenderJob, RenderStage, StageFailed, TextLayerSettings
from ..job.rows import failure_row, keyed
from ..model.prompt import TASK_PROMPTS
from ..records.dataset import DatasetRecord, DatasetRecorder, new_run_id
from ..records.output import SCHEMA
from ..records.recorder import JobSummary
from ..sources.discover import Document, escaped, unescaped
from ..sources.rasterize import PageImage, page_pixel_cap
from ..storage import ObjectPath, check_reachable, input_path, is_url
from .ray_files import FileSet, local_copy, start_file_server

log = logging.getLogger("ocrbatch")

RAY_MISSING = "the ray engine needs Ray: pip install 'ocrbatch[ray]' (or pip install 'ray[data]')"
# What the vision stage hands the decode stage, one row a page: pickled, either the page's
# PageWork with one GenerationRequest per unit (``work``), or its finished output row (``row``).
ENCODED_SCHEMA = pa.schema([
    ("path", pa.string()), ("doc_id", pa.string()), ("page", pa.int32()), ("page_count", pa.int32()),
    ("work", pa.large_binary()), ("row", pa.large_binary()), ("vision_node", pa.string()),
    ("encoded_at", pa.float64()),
])
# Output rows as the local engine builds them (created_at an ISO string, which the dataset writer
# parses), plus what they do not keep: the generated ids, the Ray node of each stage, and when (Unix
# time) the vision stage handed the page on and the decode stage finished it.
DEBUG_FIELDS = [("token_ids", pa.list_(pa.int32())), ("vision_node", pa.string()), ("decode_node", pa.string()),
                ("encoded_at", pa.float64()), ("decoded_at", pa.float64())]
DECODED_SCHEMA = pa.schema([*SCHEMA.set(SCHEMA.get_field_index("created_at"), pa.field("created_at", pa.string())),
                            *DEBUG_FIELDS])


@dataclass
class RemoteSettings:
    """``--backend openai``: the server every :class:`RemoteStage` actor sends its pages to."""

    base_url: str
    api_key: str | None
    model: str | None  # the served model's name, once the driver has checked the server
    concurrency: int  # requests in flight per actor
    timeout_s: float

    @classmethod
    def of(cls, options) -> RemoteSettings:
        return cls(options.base_url, options.api_key, options.remote_model, options.concurrency,
                   options.effective_page_timeout)

    def recognizer(self) -> RemoteRecognizer:
        return RemoteRecognizer(self.base_url, api_key=self.api_key, model=self.model, concurrency=self.concurrency,
                                timeout_s=self.timeout_s)


@dataclass
class StageConfig:
    """What every stage actor needs, sent to it once when it starts."""

    weights: FileSet | None  # the model folder (None with --backend openai: no model here)
    gguf: FileSet | None
    model_name: str
    quant: str
    task: str
    max_tokens: int
    ignore_eos: bool
    dpi: float
    max_pixels: int | None
    text_layer: TextLayerSettings
    layout: LayoutSettings
    stitch: bool
    max_batch_patches: int
    vision_dtype: str
    vision_device: str
    vision_threads: int
    decode_threads: int
    seqs: int
    node_cache: str
    always_copy_models: bool
    storage_options: dict  # --storage-option: how the actors reach documents in object storage
    layout_files: FileSet | None = None  # --layout-model's weights, when they are a file or folder of the driver's
    file_server: object = None  # the ray_files.FileServer actor on the driver's node, once Ray is up
    remote: RemoteSettings | None = None  # --backend openai: the server, instead of the models

    def flow(self) -> PageFlow:
        """The page flow every actor drives, as the local engine's."""
        return PageFlow(self.task, TASK_PROMPTS[self.task], self.model_name, self.quant, stitch=self.stitch)

    @property
    def model_files(self) -> list[FileSet]:
        """The driver's files the actors read: the model and its GGUF (none with a server), the layout weights."""
        return [files for files in (self.weights, self.gguf, self.layout_files) if files]

    def local(self, files: FileSet) -> str:
        """This node's path of ``files``, copied from the driver if this node does not see the driver's."""
        return str(local_copy(files, self.file_server, Path(self.node_cache), self.always_copy_models))


@dataclass
class RayJobSummary(JobSummary):
    """The local engine's summary plus where the pages ran: ``nodes[stage][node_id]`` = pages."""

    nodes: dict[str, Counter] = field(default_factory=lambda: {"vision": Counter(), "decode": Counter()})
    lost_pages: int = 0  # pages whose actors died, run again one page per task


# -- the Ray stages --------------------------------------------------------------------


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class PageStage:
    """What the actors that take manifest rows share: the local engine's render stage, and rows naming their node."""

    def __init__(self, config: StageConfig, max_pixels: int):
        self.config = config
        self.flow = config.flow()
        # The local engine's render stage, one for the actor's life: its render process (and layout
        # model) starts once, and a document that crashes it is quarantined there instead of killing
        # the actor. Each batch's documents are fed to it through ``jobs``.
        self.jobs: queue.Queue = queue.Queue()
        self.pages: queue.Queue = queue.Queue()
        layout = config.layout
        if config.layout_files:
            layout = replace(layout, model=config.local(config.layout_files))
        RenderStage(iter(self.jobs.get, None), config.dpi, max_pixels, self.pages,
                    threading.Event(), text_layer=config.text_layer, layout=layout).start()
        self.failure: StageFailed | None = None
        self.node = _node_id()

    def _document_path(self, path: str) -> Path | ObjectPath:
        """A manifest path as the render stage opens it: an object by its URL, a file by its (unescaped) path."""
        return input_path(path, self.config.storage_options) if is_url(path) else unescaped(path)

    def _render(self, items: list[dict]) -> Iterator[PageImage]:
        """The render stage's page for each manifest item as it comes: rendered, failed or read from its text layer."""
        if self.failure is None:
            by_document: dict[tuple[str, str, int], list[int]] = defaultdict(list)
            for item in items:
                by_document[(item["path"], item["doc_id"], item["page_count"])].append(item["page"])
            for (path, doc_id, page_count), numbers in by_document.items():
                self.jobs.put(RenderJob(Document(self._document_path(path), doc_id), numbers, page_count))
            left = len(items)  # one page comes back per page asked for
            try:
                while left and self.failure is None:
                    page = self.pages.get()
                    if isinstance(page, StageFailed):
                        self.failure = page
                    else:
                        left -= 1
                        yield page
            finally:
                # A caller that stopped early (an error) leaves pages of this batch to come: they are read
                # here, so that the next batch does not take them for its own.
                while left and self.failure is None:
                    if isinstance(page := self.pages.get(), StageFailed):
                        self.failure = page
                    left -= 1
        if self.failure is not None:
            # The stage's thread has ended, so this actor cannot render any more: its pages come back
            # missing and are run again, one page per task.
            raise OcrbatchError(f"the {self.failure.stage} stage failed: {self.failure.error}")

    def _row(self, page: PageImage, **values) -> dict:
        return {"path": escaped(page.document.path), "doc_id": page.document.doc_id, "page": page.page,
                "page_count": page.page_count, "vision_node": self.node, **values}


class VisionStage(PageStage):
    """Ray actor: render pages and encode their units; one batch of manifest rows in, pages to decode out."""

    def __init__(self, config: StageConfig):
        from ..engine import Engine

        self.engine = Engine(config.local(config.weights), quant=config.quant, gguf=config.local(config.gguf),
                             vision_dtype=config.vision_dtype, device=config.vision_device,
                             max_tokens=config.max_tokens, threads=config.vision_threads, with_language=False)
        self.engine.prompt_text(config.task)  # a task the model was not trained for fails the actor here
        # Requests are built here, where the embeddings are, and decoded by a decode actor.
        self.requests = LocalDecoder(self.engine, None, config.max_tokens, config.ignore_eos)
        super().__init__(config, page_pixel_cap(config.layout.name, self.engine.vision.image_processor.size.longest_edge,
                                                config.max_pixels, config.task))

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        """Each page of the batch as a table of its own, as soon as its last unit is encoded.

        Ray Data hands each table to the decode pool as a block while this
        call goes on encoding (see :func:`_stream`), so the batch's first
        pages are decoding while its last ones are encoded.
        """
        works = []
        for page in self._render(batch.to_pylist()):
            started = self.flow.start(page)
            if isinstance(started, FinishedPage):
                yield self._table(self._finished(started))
            else:
                works.append(started)
        requests: dict[int, list] = defaultdict(list)
        for item in self.flow.encode(self.engine.vision, works, self.config.max_batch_patches):
            if isinstance(item, FinishedPage):  # a unit the encoder refused: its page failed
                yield self._table(self._finished(item))
                continue
            work, unit = item
            requests[id(work)].append(self.requests.request(unit))
            unit.encoded = None  # the request carries the embeddings
            if len(requests[id(work)]) == len(work.units):
                page_work = pickle.dumps((work, requests.pop(id(work))), protocol=pickle.HIGHEST_PROTOCOL)
                yield self._table(self._row(work.page, work=page_work))

    @staticmethod
    def _table(row: dict) -> pa.Table:
        return pa.Table.from_pylist([{**row, "encoded_at": time.time()}], schema=ENCODED_SCHEMA)

    def _finished(self, finished: FinishedPage) -> dict:
        """A page that needs no decoding, carrying its output row."""
        row = keyed(finished.page.document, finished.row)
        return self._row(finished.page, row=pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL))


class RemoteStage(PageStage):
    """Ray actor of ``--backend openai``: render pages and send their units to the server; output rows out.

    No model is loaded: the units go, as images sized within the server's
    pixel bounds (each block with its loop guard), through the local
    engine's remote backend, ``--concurrency`` at a time, and each answer is
    settled in the page flow as the local engine settles it.
    """

    def __init__(self, config: StageConfig):
        self.recognizer = config.remote.recognizer()
        # This node reaches the server too (else the actor, and so the run, fails with the reason), and
        # reads the model's pixel bounds for whole pages, as the local engine does.
        self.recognizer.check()
        self.decoder = RemoteDecoder(self.recognizer, config.max_tokens, config.ignore_eos)
        super().__init__(config, page_pixel_cap(config.layout.name, self.recognizer.model_pixel_bounds[1],
                                                config.max_pixels, config.task))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = BatchRows(self.node)
        decoding = UnitsInFlight(self.decoder, self.flow, rows)
        with closing(self._render(batch.to_pylist())) as pages:
            for page in pages:  # each page's units are sent as it is rendered
                started = self.flow.start(page)
                if isinstance(started, FinishedPage):
                    decoding.record(started)
                    continue
                for work, unit in self.flow.unencoded([started]):
                    decoding.submit(work, unit)
                decoding.take(0)
        while decoding.units:
            decoding.take(0.5)
        return pa.Table.from_pylist(rows.rows, schema=DECODED_SCHEMA)


@dataclass
class BatchRows:
    """A :class:`RemoteStage` batch's finished rows, each naming the actor's node (the page flow's recorder)."""

    node: str
    rows: list[dict] = field(default_factory=list)

    def add(self, row: dict) -> None:
        self.rows.append({**row, "vision_node": self.node})


class DecodeStage:
    """Ray actor: one llama.cpp context decoding several units at once; pages in, output rows out.

    Calls run in threads of their own (see :func:`_stream`), each with a
    page or a few, and share one :class:`~ocrbatch.model.language.DecodeThread`,
    so a page that arrives joins those decoding between two steps.
    """

    def __init__(self, config: StageConfig):
        from transformers import AutoImageProcessor

        from ..engine import context_size
        from ..model.language import DecodeThread, LanguageModel
        from ..model.prompt import PromptBuilder
        from ..model.weights import ModelWeights

        self.config = config
        weights = ModelWeights.open(config.local(config.weights))
        merge_size = weights.config.vision_config.spatial_merge_size
        self.prompts = PromptBuilder(weights.path, weights.config.image_token_id, merge_size)
        self.flow = config.flow()
        n_ctx = context_size(AutoImageProcessor.from_pretrained(weights.path), merge_size, config.seqs,
                             config.max_tokens)
        model = LanguageModel(config.local(config.gguf), n_ctx=n_ctx, n_seq_max=config.seqs,
                              n_threads=config.decode_threads)
        # A llama.cpp build this node's CPU cannot run kills the actor here, before it takes a page:
        # the pool cannot start and the run stops with its pages pending, as the local pool does.
        model.warm_up()
        self.decoder = DecodeThread(model)
        self.node = _node_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(decode_rows(self, batch.to_pylist()), schema=DECODED_SCHEMA)


def decode_rows(stage: DecodeStage, rows: list[dict]) -> list[dict]:
    """Output rows for a batch of pages: every unit of every page decoded together; a failed unit fails its page."""
    out, pages = [], []
    for row in rows:
        nodes = {"vision_node": row["vision_node"], "decode_node": stage.node, "encoded_at": row["encoded_at"]}
        if row["row"] is not None:
            out.append({**pickle.loads(row["row"]), **nodes, "decoded_at": time.time()})
        else:
            work, requests = pickle.loads(row["work"])
            pages.append((work, [stage.decoder.submit(request) for request in requests], nodes))
    for work, futures, nodes in pages:
        finished, token_ids = None, []
        for unit, future in zip(work.units, futures):
            result = future.result()
            token_ids += [] if result.error else result.token_ids
            finished = stage.flow.settle(work, unit, decoded(result, stage.prompts, unit.spotting)) or finished
        row = keyed(finished.page.document, finished.row)
        if row["status"] == "ok":
            row["token_ids"] = token_ids
        out.append({**row, **nodes, "decoded_at": time.time()})
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
    try:
        if address is None:
            # Ray reports usage statistics to its makers unless told not to; documents stay private here.
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            cpus = settings.num_cpus or max(os.cpu_count() or 1, math.ceil(cpus_needed) + 1)
            ray.init(address="local", num_cpus=cpus,
                     object_store_memory=settings.object_store_memory or default_object_store_bytes(),
                     include_dashboard=False, runtime_env=settings.runtime_env)
        else:
            ray.init(address=address, runtime_env=settings.runtime_env)
    except BaseException:
        # A connection refused half-way (a runtime_env Ray rejects) leaves this process connected,
        # and a later run or ``Cluster.shutdown`` in the same process would find it so.
        if ray.is_initialized():
            ray.shutdown()
        raise
    return True


def _stream(ray, manifest: list[dict], config: StageConfig, settings: RaySettings, decode_actors: int,
            max_retries: int, one_page_per_task: bool, vision_batch: int) -> Iterator[dict]:
    """Run the manifest through the two actor pools (one with a server) and yield output rows as they finish."""
    # A small run is cut finer so that every vision actor (or, with a server, every actor) gets some of it.
    share = max(1, math.ceil(len(manifest) / settings.vision_actors))
    vision_batch = 1 if one_page_per_task else min(vision_batch, share)
    vision_tasks = math.ceil(len(manifest) / vision_batch)
    # When pages run alone, an actor holds one task at a time: tasks queued on an actor die with
    # it, and would spend their retries on another page's crash.
    in_flight = 1 if one_page_per_task else None
    # No more actors than tasks: an idle actor costs its start-up and memory.
    vision_pool = ray.data.ActorPoolStrategy(size=min(settings.vision_actors, vision_tasks),
                                             max_tasks_in_flight_per_actor=in_flight)
    # A decode actor takes one page a call, several calls at once, which share its llama.cpp context:
    # enough pages to fill its sequences and as many waiting, each decoding as soon as it is encoded.
    decode_calls = 1 if one_page_per_task else 2 * config.seqs
    decode_pool = ray.data.ActorPoolStrategy(size=min(decode_actors, len(manifest)),
                                             max_tasks_in_flight_per_actor=in_flight,
                                             max_concurrent_calls_per_actor=decode_calls,
                                             enable_true_multi_threading=decode_calls > 1)
    dataset = ray.data.from_items(manifest, override_num_blocks=vision_tasks)
    remote_args = dict(max_restarts=-1, max_task_retries=max_retries, scheduling_strategy="SPREAD")
    with warnings.catch_warnings():
        # max_task_retries and scheduling_strategy are only reachable through the deprecated
        # **ray_remote_args (until Ray 2.64). Ray Data's default retries (-1, forever) would loop on a
        # page that kills every actor, and without SPREAD a pool may land on one node whole.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        dataset = dataset.map_batches(
            RemoteStage if config.remote else VisionStage, fn_constructor_args=(config,), batch_size=vision_batch,
            batch_format="pyarrow", compute=vision_pool, num_cpus=settings.vision_cpus,
            num_gpus=settings.vision_gpus or None, **remote_args)
        if not config.remote:  # with a server, the first pool's actors make the output rows themselves
            dataset = dataset.map_batches(
                DecodeStage, fn_constructor_args=(config,), batch_size=1, batch_format="pyarrow",
                compute=decode_pool, num_cpus=settings.decode_cpus, **remote_args)
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from table.to_pylist()


def _stage_config(options, settings: RaySettings, seqs: int, remote: RemoteSettings | None = None) -> StageConfig:
    """Resolve the model and convert the GGUF once, here, for every actor to read (with a server: neither).

    The layout model is loaded here once too, and dropped: one that cannot
    load is a fatal error before any page is written, as in the local engine,
    rather than every page failing on actors that cannot render.
    """
    if remote is None:
        weights, gguf, later_release = _model_files(options)
        model_name, quant = str(options.model), options.quant.upper()
    else:
        # Without the model here, the current releases' layout model is the default, as in the local engine.
        weights = gguf = None
        later_release, model_name, quant = True, remote.model, "remote"
    vision_threads = max(1, int(settings.vision_cpus))
    layout = LayoutSettings(options.layout, options.layout_model, vision_threads,
                            later_release=later_release, recognised=options.recognised_pictures)
    try:
        layout.load()
    except Exception as exc:
        raise OcrbatchError(f"cannot load the layout model: {type(exc).__name__}: {exc}") from None
    return StageConfig(
        weights=weights, gguf=gguf, remote=remote,
        model_name=model_name, quant=quant, task=options.task, max_tokens=options.max_tokens,
        ignore_eos=options.ignore_eos, dpi=options.dpi, max_pixels=options.max_pixels,
        text_layer=TextLayerSettings(options.pdf_text, options.trust_ocr_layer), layout=layout,
        stitch=options.stitch,
        max_batch_patches=options.max_batch_patches, vision_dtype=options.vision_dtype,
        vision_device="cuda" if settings.vision_gpus else options.device, vision_threads=vision_threads,
        decode_threads=max(1, int(settings.decode_cpus)), seqs=seqs, node_cache=settings.node_cache,
        always_copy_models=settings.always_copy_models,
        storage_options=next((dict(p.options) for p in options.paths if isinstance(p, ObjectPath)), {}),
        layout_files=FileSet.of(options.layout_model) if layout_model_is_a_path(options.layout_model) else None)


def _model_files(options) -> tuple[FileSet, FileSet, bool]:
    """The model folder, its GGUF (converted here once) and whether it is a later release (1.5+)."""
    from ..model.gguf import convert
    from ..model.prompt import PromptBuilder
    from ..model.weights import ModelWeights

    weights = ModelWeights.open(options.model)
    prompts = PromptBuilder(weights.path, weights.config.image_token_id,
                            weights.config.vision_config.spatial_merge_size)
    if options.seals:
        prompts.task_text("seal")  # a 1.0 model cannot: refused before any actor starts
    gguf = convert(options.gguf or weights.path, options.quant.upper(), cache=options.cache_dir)
    return FileSet.of(weights.path), FileSet.of(gguf), prompts.supports_later_tasks


def _checked_server(options) -> RemoteSettings:
    """``--backend openai``'s server, checked here before anything is planned or written, with its model's name.

    One that cannot be reached (or does not serve ``--remote-model``) raises
    :class:`~ocrbatch.backends.remote.BackendUnavailable`: a fatal error (exit
    3) that leaves every page to do, as in the local engine.
    """
    remote = RemoteSettings.of(options)
    with remote.recognizer() as recognizer:
        remote.model = recognizer.check()
    return remote


def layout_model_is_a_path(layout_model: str | None) -> bool:
    """Whether ``--layout-model`` names weights on the driver's disk (rather than a Hub id each node resolves)."""
    return bool(layout_model) and Path(layout_model).exists()


def run_ray_job(options, address: str | None = None, settings: RaySettings | None = None,
                on_row: Callable[[dict], None] | None = None):
    """Run the batch job described by ``options`` (a :class:`JobOptions`) on Ray; returns its summary.

    ``options.out`` is the dataset folder. ``address`` joins a running
    cluster (``auto``, ``ray://host:port``, ``host:port``); without it a
    fresh local instance is started and shut down at the end. ``on_row`` sees
    every finished row with the extra fields of :data:`DEBUG_FIELDS`.
    Raises :class:`ocrbatch.records.lock.JobLocked` when another run holds the
    dataset, and :class:`OcrbatchError` for fatal problems.
    """
    ray = import_ray()
    # Before anything is planned or written: a missing bucket is not the documents' fault (exit 3).
    check_reachable([*options.paths, options.out])
    settings = settings or RaySettings()
    started = time.monotonic()
    remote = _checked_server(options) if options.backend == "openai" else None
    model_name, quant = (remote.model, "remote") if remote else (str(options.model), options.quant.upper())
    decode_actors = settings.decode_actors or options.workers
    seqs = settings.seqs_per_actor or options.seqs_per_worker
    record = DatasetRecord(options.out)
    summary = RayJobSummary()
    with record.lock():
        record.check_settings(options.record_settings(model_name, quant))
        repaired = record.recover()
        if repaired:
            log.info("%s: removed %d duplicate rows left by an interrupted run", options.out, repaired)
        plan = planner.plan_dataset(options, record)
        summary.pages_skipped, summary.documents, summary.deferred_files = plan.skipped, plan.documents, plan.deferred
        summary.special_files = plan.special
        log.info("%d pages to process in %d documents (%d unreadable), %d already done",
                 len(plan.manifest), plan.documents, len(plan.unreadable), plan.skipped)
        config = _stage_config(options, settings, seqs, remote) if plan.manifest else None
        run_id = new_run_id()
        sink = DatasetRecorder(record, run_id, summary, options.flush_rows, options.flush_seconds, on_row,
                               len(plan.manifest) + len(plan.unreadable), options.progress)
        try:
            for document, error in plan.unreadable:
                sink.add(keyed(document, failure_row(0, 0, options.task, error, model_name, quant)))
            if plan.manifest:
                _process(ray, plan.manifest, config, settings, options, address, decode_actors, sink)
        finally:
            sink.flush()
            sink.close()
        record.compact(run_id)
        summary.failed_earlier = record.counts()["pages"].get("failed", 0) - summary.pages_failed
    summary.elapsed_s = time.monotonic() - started
    return summary


def _process(ray, manifest: list[dict], config: StageConfig, settings: RaySettings, options, address,
             decode_actors: int, sink: DatasetRecorder) -> None:
    cpus = settings.vision_actors * settings.vision_cpus + (0 if config.remote else decode_actors * settings.decode_cpus)
    started_ray = connect(ray, address, settings, cpus)
    try:
        context = ray.data.DataContext.get_current()
        context.max_errored_blocks = -1  # an errored block's pages come back missing and are redone below
        context.enable_progress_bars = False  # the job's own bar counts pages
        # Every table a stage yields is a block of its own: a vision actor's pages go on to the decode
        # pool one by one as they are encoded, rather than as one block at the end of its batch.
        context.target_max_block_size = 1
        # Every actor of a pool is up before work starts, so work is spread over all of them
        # rather than the first one ready; this also turns a pool the cluster cannot place into an error.
        context.wait_for_min_actors_s = settings.actor_start_timeout_s
        if config.model_files:  # none with a server and no layout weights of the driver's
            config = replace(config, file_server=start_file_server(ray, config.model_files))
        # With a server, an actor's batch keeps its requests in flight and as many waiting.
        vision_batch = max(options.batch_size, 2 * options.concurrency) if config.remote else options.batch_size
        run = dict(config=config, settings=settings, decode_actors=decode_actors, max_retries=options.max_retries,
                   vision_batch=vision_batch)
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
                # The manifest's path is escaped already, as the row's path column and the message keep it.
                row = failure_row(item["page"], item["page_count"], config.task, "", config.model_name, config.quant)
                row["error"] = (f"{item['path']} page {item['page']}: lost with its Ray actor, also when run alone "
                                f"with {options.max_retries} retries (the actor died: a crash in the vision encoder "
                                "or llama.cpp, or out of memory; or an error in the Ray logs)")
                sink.add({"path": item["path"], "doc_id": item["doc_id"], **row})
    except ray.exceptions.RayError as exc:
        # An actor that cannot start (a bad device, too little memory) fails the pool, and so the run.
        raise OcrbatchError(f"the Ray job failed: {str(exc).strip().splitlines()[-1]}") from exc
    finally:
        if started_ray:
            ray.shutdown()

