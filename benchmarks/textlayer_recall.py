"""Word recall of text-layer Markdown against the page's own text, over a corpus of real PDFs.

For every page of every PDF under the given folders (at most
``--pages-per-doc`` per document), the text-layer route runs as the batch job
runs it in ``--pdf-text auto``; for each page it takes from the text layer,
the Markdown is compared with ``page.get_text()``: the share of the layer's
words (counted with repeats, case-folded, each CJK character a word) that the
Markdown has. A page read wrongly (glyph garbage, a rotated page whose
Markdown is empty, vertical text cut into one-character cells) scores low.
Pages whose layer has no words are left out of the figures.

That plain measure also counts against the Markdown what it leaves out on
purpose (running headers and footers, text in pictures, sideways margin
notes), bold faked by printing a word twice, and words MuPDF splits where
their letters are set apart. The router's own check
(``ocrbatch.sources.textlayer.MIN_MARKDOWN_RECALL``) allows for those; its figure
for each text-layer page is reported beside the plain one.

    python benchmarks/textlayer_recall.py /tmp/corpus --out benchmarks/results/textlayer-recall.json

The corpus used for the recorded figures: every PDF in the source trees of
PyMuPDF (tests/resources), pdfplumber (tests/pdfs) and pdfminer.six (samples).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import write_results  # helpers in the same folder

from ocrbatch.sources.textlayer import layer_words, route


def word_recall(reference: Counter, candidate: Counter) -> float:
    return sum(min(count, candidate[word]) for word, count in reference.items()) / sum(reference.values())


def measure(folders: list[Path], pages_per_doc: int) -> dict:
    import pymupdf

    pages, skipped, started = [], [], time.perf_counter()
    for path in sorted(p for folder in folders for p in folder.rglob("*.pdf")):
        try:
            with pymupdf.open(path, filetype="pdf") as pdf:
                if pdf.needs_pass:
                    skipped.append(f"{path.name}: encrypted")
                    continue
                numbers = range(1, min(pdf.page_count, pages_per_doc) + 1)
                layer = {number: Counter(layer_words(pdf[number - 1].get_text())) for number in numbers}
            routes = route(path, numbers, "auto")
        except Exception as exc:  # the corpus has broken files on purpose
            skipped.append(f"{path.name}: {type(exc).__name__}: {exc}")
            continue
        for number, chosen in routes.items():
            entry = {"file": path.name, "page": number, "source": chosen.source, "words": sum(layer[number].values()),
                     "reason": chosen.verdict.reason}
            if chosen.source == "text-layer" and layer[number]:
                entry["recall"] = round(word_recall(layer[number], Counter(layer_words(chosen.markdown))), 4)
                entry["checked_recall"] = chosen.verdict.markdown_recall
            pages.append(entry)
    recalls = [page["recall"] for page in pages if "recall" in page]
    checked = [page["checked_recall"] for page in pages if page.get("checked_recall") is not None]
    return {
        "documents_skipped": skipped,
        "pages": len(pages),
        "pages_text_layer": sum(page["source"] == "text-layer" for page in pages),
        "pages_model": sum(page["source"] == "model" for page in pages),
        "pages_measured": len(recalls),
        "recall_median": statistics.median(recalls) if recalls else None,
        "pages_recall_below_0.9": sum(recall < 0.9 for recall in recalls),
        "pages_recall_below_0.5": sum(recall < 0.5 for recall in recalls),
        "checked_recall_median": statistics.median(checked) if checked else None,
        "pages_checked_recall_below_0.9": sum(recall < 0.9 for recall in checked),
        "seconds": round(time.perf_counter() - started, 1),
        "worst": sorted((page for page in pages if "recall" in page), key=lambda page: page["recall"])[:25],
        "per_page": pages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="Folders searched for *.pdf.")
    parser.add_argument("--pages-per-doc", type=int, default=10, help="First pages of each document measured.")
    parser.add_argument("--note", action="append", default=[], help="A note to store in the results (repeatable).")
    parser.add_argument("--out", type=Path, help="Also write the results (JSON) here.")
    args = parser.parse_args()
    results = measure(args.folders, args.pages_per_doc)
    results["notes"] = args.note
    write_results(results, args.out)


if __name__ == "__main__":
    main()
