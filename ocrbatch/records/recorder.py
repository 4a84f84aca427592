"""The record stage: finished pages → checkpoint, output file, Markdown, progress and summary.

A page is committed to the checkpoint first and then buffered for the output
file, so a run killed between the two loses nothing: the next run rebuilds
the output from the checkpoint. An output that cannot be written (disk full,
no permission) raises :class:`OutputError`, a fatal error that leaves the
checkpoint intact.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OcrbatchError
from ..job.options import JobOptions
from ..job.rows import failure_row, keyed
from ..job.units import recorded_blocks
from ..layout.markdown import DocumentPage, document_markdown, image_filename
from ..sources.discover import Document
from .sqlite import Store
from .stats import work_seconds

log = logging.getLogger("ocrbatch")

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_FATAL = 3
EXIT_LOCKED = 4


class OutputError(OcrbatchError):
    """The output (or Markdown) cannot be written; the checkpoint is intact."""


@dataclass
class JobSummary:
    pages_ok: int = 0
    pages_text_layer: int = 0  # of the ok pages, those taken from a PDF text layer
    pages_failed: int = 0
    pages_skipped: int = 0
    pages_left: int = 0  # planned but neither ok nor failed when the run ended
    failed_earlier: int = 0  # failed pages in the output from earlier runs, not redone in this one
    documents: int = 0
    deferred_files: int = 0
    special_files: int = 0  # FIFOs, devices, sockets found under the paths: skipped
    elapsed_s: float = 0.0
    worker_crashes: int = 0
    render_crashes: int = 0
    stopped_by: int | None = None  # the signal that stopped the run early
    # Seconds of work (the stages' times, summed over pages) of each document this run processed.
    document_work_s: Counter = field(default_factory=Counter)

    def add_work(self, path: str, row: dict) -> None:
        self.document_work_s[path] += work_seconds(row)

    def count(self, row: dict) -> None:
        """Count one finished row (with its ``path``) of this run; a failed one is logged with its reason."""
        self.add_work(row["path"], row)
        if row["status"] == "ok":
            self.pages_ok += 1
            self.pages_text_layer += row.get("source") == "text-layer"
        else:
            self.pages_failed += 1
            log.warning("%s", row["error"])

    @property
    def exit_code(self) -> int:
        """The state of the output, not only of this run: 1 while it holds a failed page from any run.

        So a re-run, or the run that resumes a killed one, does not report 0 over failed rows.
        """
        if self.stopped_by is not None:
            return 128 + self.stopped_by
        if self.pages_left:
            return EXIT_FATAL
        return EXIT_SOME_FAILED if self.pages_failed or self.failed_earlier else EXIT_OK

    def line(self, out: Path) -> str:
        done = self.pages_ok + self.pages_failed
        rate = done / self.elapsed_s * 60 if self.elapsed_s > 0 else 0.0
        extras = []
        if self.pages_left:
            extras.append(f"{self.pages_left} left pending")
        if self.failed_earlier:
            extras.append(f"{self.failed_earlier} failed pages from earlier runs in the output")
        if self.deferred_files:
            extras.append(f"{self.deferred_files} files still being written, left for the next run")
        if self.special_files:
            extras.append(f"{self.special_files} special files (FIFOs, devices, sockets) skipped")
        if self.worker_crashes:
            extras.append(f"{self.worker_crashes} llama.cpp worker crashes")
        if self.render_crashes:
            extras.append(f"{self.render_crashes} render process crashes")
        if self.stopped_by is not None:
            extras.append("stopped early by a signal: run again to resume")
        source = f"; {self.pages_text_layer} from the text layer" if self.pages_text_layer else ""
        return (f"ocrbatch: {done} pages processed ({self.pages_ok} ok, {self.pages_failed} failed{source}), "
                f"{self.pages_skipped} already done, {self.documents} documents, "
                + "".join(f"{extra}, " for extra in extras)
                + f"{self.elapsed_s:.1f} s, {rate:.1f} pages/min{self._shares(done)}{self._slowest()} -> {out}")

    def _shares(self, done: int) -> str:
        if not done:
            return ""
        model = self.pages_ok - self.pages_text_layer
        return (f" ({self.pages_text_layer / done:.0%} text layer, {model / done:.0%} model, "
                f"{self.pages_failed / done:.0%} failed)")

    def _slowest(self, count: int = 3) -> str:
        slowest = [(path, seconds) for path, seconds in self.document_work_s.most_common(count) if seconds > 0]
        return "; slowest: " + ", ".join(f"{path} {seconds:.1f} s" for path, seconds in slowest) if slowest else ""


def markdown_stem(path: Path, doc_id: str) -> str:
    """The name (less suffix) of a document's Markdown file and of its picture folder.

    It is linked from the Markdown, which is UTF-8: bytes of the name that are not UTF-8 become
    U+FFFD (the document id in the name keeps it unique).
    """
    return os.fsencode(path.stem).decode("utf-8", "replace") + f"-{doc_id[:8]}"


def markdown_images_folder(folder: Path, path: Path, doc_id: str) -> Path:
    """Where a document's picture crops are saved, beside its Markdown file in ``folder``."""
    return folder / f"{markdown_stem(path, doc_id)}-images"


def write_markdown(store: Store, doc_id: str, folder: Path) -> Path:
    """One Markdown file per document, pages in order, with the passes over the whole document.

    Layout pages are written again from their recorded blocks (see
    :func:`ocrbatch.layout.markdown.document_markdown`), their pictures linked where their
    crops were saved; other pages as recorded, failed ones as a comment.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = store.document_path(doc_id)
    images = markdown_images_folder(folder, path, doc_id)
    pages = []
    for row in store.document_pages(doc_id):
        number = row["page"]
        failed = row["status"] != "ok"
        text = f"<!-- page {number} failed: {row.get('error')} -->" if failed else row.get("text") or ""
        items = [(block, output, _saved_crop(images, number, block)) for block, output in recorded_blocks(row)]
        pages.append(DocumentPage(number, text, items if items and not failed else None))
    target = folder / f"{markdown_stem(path, doc_id)}.md"
    target.write_text(document_markdown(pages), encoding="utf-8")
    return target


def _saved_crop(images: Path, page: int, block) -> str | None:
    """The link to a picture block's saved crop, if it was saved."""
    if block.prompt is not None:
        return None
    name = image_filename(page, block)
    return f"{images.name}/{name}" if (images / name).is_file() else None


class Recorder:
    """The local engine's record (a :class:`~ocrbatch.records.base.PageRecorder`): finished pages of one run
    into the checkpoint, the output and Markdown, with the run's counters and progress bar."""

    def __init__(self, options: JobOptions, store: Store, writer, model_name: str, quant: str, total: int):
        from tqdm import tqdm

        self.options, self.store, self.writer = options, store, writer
        self.model_name, self.quant = model_name, quant
        self.summary = JobSummary()
        self.buffer: list[dict] = []
        self.last_flush = time.monotonic()
        self.remaining: dict[str, int] = {}
        self.markdown_written: set[str] = set()
        self.progress = tqdm(total=total, unit="page", disable=None if options.progress else True,
                             dynamic_ncols=True, desc="ocrbatch")

    def write(self, rows: list[dict]) -> None:
        """Write rows to the output now."""
        try:
            self.writer.write(rows)
        except OSError as exc:
            raise OutputError(f"{self.options.out}: cannot write the output ({exc.strerror or exc}); "
                              "the checkpoint is intact: run again once this is fixed") from None

    def emit(self, row: dict) -> None:
        self.buffer.append(row)
        if (len(self.buffer) >= self.options.flush_rows
                or time.monotonic() - self.last_flush >= self.options.flush_seconds):
            self.flush()

    def flush(self) -> None:
        rows, self.buffer = self.buffer, []
        self.write(rows)
        self.last_flush = time.monotonic()

    def expect(self, document: Document, pages: int) -> None:
        self.remaining[document.doc_id] = pages

    def add(self, row: dict) -> None:
        """Commit a finished (ok or failed) page's row (:func:`~ocrbatch.job.rows.keyed`), then buffer it for the output.

        The checkpoint keeps the row without its path and content id, which are the document's.
        """
        doc_id = row["doc_id"]
        result = {key: value for key, value in row.items() if key not in ("path", "doc_id")}
        self.store.record_page(doc_id, row["page"], row["status"], result, row.get("error"))
        self.emit(row)
        self.summary.count(row)
        self.progress.update(1)
        self.remaining[doc_id] -= 1
        if self.remaining[doc_id] == 0:
            self.store.finish_document(doc_id, self.options.max_page_error_rate)
            if self.options.markdown_dir:
                self.markdown(doc_id)

    def document_failed(self, document: Document, error: str) -> None:
        """A document that cannot be opened: one failed row, page 0."""
        row = failure_row(0, 0, self.options.task, error, self.model_name, self.quant)
        self.store.record_document_failure(document.doc_id, document.path, row["error"], row)
        row = keyed(document, row)
        self.emit(row)
        self.summary.count(row)
        self.progress.update(1)

    def markdown(self, doc_id: str) -> None:
        try:
            write_markdown(self.store, doc_id, self.options.markdown_dir)
        except OSError as exc:
            raise OutputError(f"{self.options.markdown_dir}: cannot write Markdown ({exc.strerror or exc}); "
                              "the checkpoint is intact: run again once this is fixed") from None
        self.markdown_written.add(doc_id)

    def close(self) -> None:
        self.progress.close()
