"""Text-layer routing: each hard case of page is judged and routed as issue 12 specifies."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pymupdf
import pytest
from pdf_fixtures import (
    A4,
    BODY,
    CHART_LABELS,
    FORMULA,
    KINDS,
    RUNNING_FOOTER,
    RUNNING_HEADER,
    STAMP,
    TABLE_COLUMNS,
    TABLE_GROUPS,
    TABLE_ROWS,
    TEXTS,
    TITLE,
    VERTICAL_JAPANESE,
    add_page,
    write_pdf,
)

from ocrbatch.sources import textlayer
from ocrbatch.sources.textlayer import (
    FONT_UNMAPPED_SHARE,
    MAX_BAD_GLYPH_RATIO,
    MIN_CHARS_PER_A4,
    MIN_MARKDOWN_RECALL,
    MIN_TEXT_COVERAGE,
    OCR_LAYER_SHARE,
    SPARE_WORDS,
    PageStats,
    assess_page,
    decide,
    judge,
    page_markdown,
    page_stats,
    route,
)

SAMPLE_REPORT = Path(__file__).resolve().parents[2] / "sample_docs" / "report.pdf"

# kind -> (good without trusting OCR layers, good when trusting them, words in the reason when not good)
EXPECTED = {
    "text": (True, True, None),
    "scan": (False, False, "no text layer"),
    "ocr-layer": (False, True, "invisible OCR layer"),
    "hidden-under-image": (False, True, "invisible OCR layer"),
    "glyphless": (False, True, "invisible OCR layer"),
    "stamp": (False, False, "text covers"),
    "garbage-fffd": (False, False, "unmapped glyphs"),
    "garbage-pua": (False, False, "unmapped glyphs"),
    "garbage-type3": (False, False, "unmapped glyphs"),
    "broken-math-font": (False, False, "unmapped glyphs"),
    "actualtext-mismatch": (False, False, "Markdown holds"),
    "sideways": (True, True, None),
    "vertical-writing": (True, True, None),
    "furniture": (True, True, None),
    "dense-table": (True, True, None),
    "blank": (True, True, None),
}
assert set(EXPECTED) == set(KINDS)


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory) -> Path:
    """One document with a page of every kind, in :data:`KINDS` order: the mixed document."""
    return write_pdf(tmp_path_factory.mktemp("textlayer") / "every-kind.pdf", list(KINDS))


def page_of(kind: str) -> int:
    return KINDS.index(kind) + 1


def words(text: str) -> str:
    """Text with Markdown emphasis dropped and whitespace collapsed, to compare wording only."""
    return " ".join(re.sub(r"[*_#]", " ", text).split())


@pytest.mark.parametrize("trust", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_judged_as_specified(every_kind, kind, trust):
    good, good_trusted, reason = EXPECTED[kind]
    verdict = route(every_kind, [page_of(kind)], "auto", trust_ocr_layer=trust)[page_of(kind)].verdict
    assert verdict.good is (good_trusted if trust else good), verdict
    if not verdict.good:
        assert reason in verdict.reason


@pytest.mark.parametrize("trust", [False, True])
def test_mixed_document_routes_each_page_in_auto_and_only(every_kind, trust):
    pages = range(1, len(KINDS) + 1)
    auto = route(every_kind, pages, "auto", trust_ocr_layer=trust)
    only = route(every_kind, pages, "only", trust_ocr_layer=trust)
    for kind in KINDS:
        good = EXPECTED[kind][1 if trust else 0]
        number = page_of(kind)
        assert auto[number].source == ("text-layer" if good else "model"), kind
        assert auto[number].error is None
        assert only[number].source == "text-layer"
        if good:
            assert only[number].error is None, kind
        else:
            assert only[number].error == f"no usable text layer: {only[number].verdict.reason}", kind


def test_never_mode_does_not_open_the_file(tmp_path):
    routes = route(tmp_path / "missing.pdf", [2, 1, 2], "never")
    assert list(routes) == [1, 2]
    assert all(r.source == "model" and r.verdict is None and r.error is None for r in routes.values())


def test_bad_modes_and_pages_are_refused(every_kind):
    with pytest.raises(ValueError, match="one of"):
        route(every_kind, [1], "sometimes")
    verdict = judge(text_stats())
    with pytest.raises(ValueError, match="needs no verdict"):
        decide(verdict, "never")
    for number in (0, len(KINDS) + 1):
        with pytest.raises(ValueError, match=f"no page {number}"):
            route(every_kind, [number], "auto")


def test_a_page_that_cannot_be_read_goes_to_the_model_or_fails(every_kind, monkeypatch):
    def broken(page, trust_ocr_layer=False):
        raise RuntimeError("syntax error in content stream")

    monkeypatch.setattr(textlayer, "assess_page", broken)
    assert route(every_kind, [1], "auto")[1].source == "model"
    assert "syntax error in content stream" in route(every_kind, [1], "only")[1].error


def test_the_measures_behind_each_verdict(every_kind):
    with pymupdf.open(every_kind) as pdf:
        verdicts = {kind: assess_page(pdf[page_of(kind) - 1]) for kind in KINDS}
        trusted = {kind: assess_page(pdf[page_of(kind) - 1], trust_ocr_layer=True) for kind in KINDS}
    body_chars = sum(len(re.sub(r"\s", "", text)) for text in TEXTS["text"])
    assert verdicts["text"].chars == body_chars
    assert verdicts["text"].coverage == 1.0 and verdicts["text"].hidden_ratio == 0.0
    for kind in ("ocr-layer", "hidden-under-image", "glyphless"):
        assert verdicts[kind].ocr_layer and verdicts[kind].hidden_ratio == 1.0
        assert verdicts[kind].chars == 0  # hidden text is not counted unless trusted
        assert trusted[kind].chars == body_chars
        assert trusted[kind].coverage == 1.0  # the scan under a trusted OCR layer counts as read
    # The stamp is seen (drawn after the scan), but covers a sliver of the page.
    assert verdicts["stamp"].chars == len(STAMP.replace(" ", "")) and verdicts["stamp"].hidden_ratio == 0.0
    assert verdicts["stamp"].coverage < 0.02
    for kind in ("garbage-fffd", "garbage-pua", "garbage-type3"):
        assert verdicts[kind].bad_glyph_ratio == 1.0
    # Only the formula's brackets and "=" read U+FFFD, too few to fail the page, but its font's map is
    # broken for a tenth of its glyphs and characters: every character in that font counts.
    formula_chars, unmapped = len(FORMULA.replace(" ", "")), sum(map(FORMULA.count, "()="))
    page_chars = body_chars + formula_chars
    assert unmapped / page_chars < MAX_BAD_GLYPH_RATIO and unmapped / formula_chars >= FONT_UNMAPPED_SHARE
    assert 3 / len(set(FORMULA.replace(" ", ""))) >= FONT_UNMAPPED_SHARE  # three distinct glyphs unmapped
    assert verdicts["broken-math-font"].bad_glyph_ratio == pytest.approx(formula_chars / page_chars)


def test_transparent_text_is_hidden_and_text_over_an_image_is_not(tmp_path):
    with pymupdf.open() as pdf:
        page = add_page(pdf, "scan")
        page.insert_text((56, 40), STAMP, fontsize=11, fill_opacity=0)
        stats = page_stats(page)
    assert stats.hidden_chars == len(STAMP.replace(" ", "")) and stats.visible_chars == 0
    with pymupdf.open() as pdf:
        stats = page_stats(add_page(pdf, "stamp"))
    assert stats.visible_chars == len(STAMP.replace(" ", "")) and stats.hidden_chars == 0


def test_rotated_pages_are_measured_in_their_own_coordinates():
    with pymupdf.open() as pdf:
        page = add_page(pdf, "text")
        page.insert_text((56, 820), "Page 1 of 1", fontsize=9)  # below the rotated page's height
        upright = assess_page(page)
        page.set_rotation(90)
        rotated = assess_page(page)
    assert rotated == upright and rotated.good


def test_text_layer_markdown_has_the_pages_real_text(every_kind, capsys):
    with pymupdf.open(every_kind) as pdf:
        text = page_markdown(pdf, page_of("text"))
        # What a trusted OCR layer yields, each kind of hiding.
        ocr_layers = [page_markdown(pdf, page_of(kind)) for kind in ("ocr-layer", "hidden-under-image", "glyphless")]
        blank = page_markdown(pdf, page_of("blank"))
    assert text.text.startswith(f"# {TITLE}")
    for written in (text, *ocr_layers):
        assert TITLE in written.text and written.recall == 1.0
        for paragraph in BODY:
            assert paragraph in words(written.text)
    assert blank.text == "" and blank.recall == 1.0
    assert capsys.readouterr().out == ""  # stdout may carry the CLI's JSON


def test_turned_and_vertical_pages_are_read_in_their_reading_order(every_kind):
    routes = route(every_kind, [page_of("sideways"), page_of("vertical-writing")], "only")
    # /Rotate 270 over lines running down the page, seen through a corner of a larger MediaBox.
    sideways = routes[page_of("sideways")].markdown
    assert sideways.startswith(f"# {TITLE}")
    for paragraph in BODY:
        assert paragraph in words(sideways)
    # Vertical Japanese: columns right to left become lines top to bottom, no one-character table cells.
    vertical = words(routes[page_of("vertical-writing")].markdown)
    assert "|" not in vertical
    positions = [vertical.find(line) for line in VERTICAL_JAPANESE]
    assert -1 not in positions and positions == sorted(positions), vertical


def test_text_layer_markdown_leaves_out_what_layout_mode_leaves_out(every_kind):
    markdown = route(every_kind, [page_of("furniture")], "only")[page_of("furniture")].markdown
    assert markdown.startswith(f"# {TITLE}")
    for paragraph in BODY:
        assert paragraph in words(markdown)
    for left_out in (RUNNING_HEADER, RUNNING_FOOTER, *CHART_LABELS[1:], "picture text", "<!--"):
        assert left_out not in markdown


def test_pictures_lose_their_labels_but_not_a_forms_text_and_formulas_count_as_missing(monkeypatch):
    """The Markdown assembled from pymupdf4llm's boxes, on a page of one line per box kind."""
    import pymupdf4llm

    form_line = ("Enter the amount of income under the appropriate rate of tax for each line below, and the tax "
                 "withheld at source in column (a)")
    assert len(form_line.replace(" ", "")) >= textlayer.MAX_PICTURE_LABEL_CHARS
    lines = {"text": BODY[0][:80], "picture-labels": "2021 2022 2023", "picture-form": form_line,
             "formula": "E = m c squared here"}
    with pymupdf.open() as pdf:
        page = pdf.new_page(width=A4[0], height=A4[1])
        boxes = []
        for row, (kind, line) in enumerate(lines.items()):
            page.insert_text((56, 100 + 100 * row), line, fontsize=7)
            boxes.append((kind.split("-")[0], (50, 85 + 100 * row, 560, 105 + 100 * row)))
        written = {"text": lines["text"] + " \n\n", "formula": f"<!-- Start of picture text -->\n{lines['formula']}"
                   "<br><!-- End of picture text -->\n\n"}
        pieces = [written.get(kind, f"\n\n<!-- Start of picture text -->\n{line}<br><!-- End of picture text -->\n\n")
                  for (kind, _), line in zip(boxes, lines.values())]
        ends = [sum(map(len, pieces[:i + 1])) for i in range(len(pieces))]
        chunk = {"text": "".join(pieces), "page_boxes": [
            {"class": kind, "bbox": box, "pos": (end - len(piece), end)}
            for (kind, box), piece, end in zip(boxes, pieces, ends)]}
        monkeypatch.setattr(pymupdf4llm, "to_markdown", lambda *args, **kwargs: [chunk])
        markdown = page_markdown(pdf, 1)
    assert markdown.text == f"{lines['text']} \n\n{form_line}"
    # The labels are not the layer's words to find; the formula's are, and are missing.
    counted = len(textlayer.layer_words(" ".join([lines["text"], form_line, lines["formula"]])))
    assert (markdown.words, markdown.found) == (counted, counted - len(textlayer.layer_words(lines["formula"])))


def test_dense_table_cells_keep_their_words_whole(every_kind):
    markdown = route(every_kind, [page_of("dense-table")], "only")[page_of("dense-table")].markdown
    cells = [" ".join(cell.split()) for cell in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", markdown)]
    for text in (*TABLE_GROUPS, *TABLE_COLUMNS, *(cell for row in TABLE_ROWS for cell in row)):
        assert text in cells, text


def test_blank_pages_are_not_written_by_pymupdf4llm(tmp_path, monkeypatch):
    def refuse(pdf, page_number):
        raise AssertionError("a blank page needs no Markdown")

    monkeypatch.setattr(textlayer, "page_markdown", refuse)
    routes = route(write_pdf(tmp_path / "blank.pdf", ["blank"] * 3), [1, 2, 3], "only")
    assert all(chosen.source == "text-layer" and chosen.markdown == "" and chosen.error is None
               for chosen in routes.values())


def routed_with_markdown(every_kind, monkeypatch, words: int, found: int, mode: str = "auto"):
    """The text page's route when its Markdown holds ``found`` of the layer's ``words``."""
    monkeypatch.setattr(textlayer, "page_markdown", lambda pdf, number: textlayer.LayerMarkdown(TITLE, words, found))
    return route(every_kind, [page_of("text")], mode)[page_of("text")]


def test_a_page_whose_markdown_misses_the_layers_words_goes_to_the_model(every_kind, monkeypatch):
    below = round(MIN_MARKDOWN_RECALL * 100) - 1
    assert routed_with_markdown(every_kind, monkeypatch, 100, below).source == "model"
    only = routed_with_markdown(every_kind, monkeypatch, 100, below, mode="only")
    assert only.error.startswith(f"no usable text layer: its Markdown holds {below}% of the text layer's words")
    assert routed_with_markdown(every_kind, monkeypatch, 100, below + 1).markdown == TITLE
    # On a page of a few words, missing one decides nothing; missing two does.
    assert routed_with_markdown(every_kind, monkeypatch, 3, 3 - SPARE_WORDS).source == "text-layer"
    assert routed_with_markdown(every_kind, monkeypatch, 3, 2 - SPARE_WORDS).source == "model"


def test_bold_faked_by_overprinting_counts_once(tmp_path):
    with pymupdf.open() as pdf:
        page = pdf.new_page(width=A4[0], height=A4[1])
        for offset in (0, 0.3, 0.6):
            page.insert_textbox(pymupdf.Rect(56 + offset, 56, 539 + offset, 786), "\n\n".join(BODY), fontsize=12)
        pdf.save(tmp_path / "fake-bold.pdf")
    with pymupdf.open(tmp_path / "fake-bold.pdf") as pdf:
        written = page_markdown(pdf, 1)
    assert written.recall == 1.0 and BODY[0] in words(written.text)


def test_words_the_layer_splits_are_found_joined_but_words_the_markdown_splits_are_not():
    assert textlayer._found_words([["the", "r", "ecorded", "loa", "ns"]], "the recorded loans") == 5
    assert textlayer._found_words([["valuation", "collateral"]], "<td>Valuatio</td><td>n Collateral</td>") == 1
    # Compared as words: ligatures spelt out, case folded, Markdown, HTML tags, entities and comments read through.
    reference = [textlayer.layer_words("ﬁled cafe"), textlayer.layer_words("CAFÉ")]
    assert textlayer._found_words(reference, "**Filed** caf&eacute; <!-- cafe -->") == 2


def test_the_sample_born_digital_report_is_taken_from_its_layer():
    from ocrbatch.dev.samples import PARAGRAPHS

    verdict = route(SAMPLE_REPORT, [1], "only")[1]
    assert verdict.source == "text-layer" and verdict.error is None
    with pymupdf.open(SAMPLE_REPORT) as pdf:
        markdown = words(page_markdown(pdf, 1).text)
    assert "Quarterly report" in markdown
    for paragraph in PARAGRAPHS[:2]:
        assert paragraph in markdown


# Threshold edges, on measured pages built to sit exactly on each side.

def text_stats(**changes) -> PageStats:
    """A plain text page on A4: good, so each test can move one measure to its edge."""
    base = PageStats(width=A4[0], height=A4[1], visible_chars=2000, visible_bad=0, hidden_chars=0, hidden_bad=0,
                     visible_boxes=((56, 56, 539, 786),), hidden_boxes=(), image_boxes=(), graphics=False,
                     drawn=True)
    return replace(base, **changes)


def test_bad_glyph_ratio_edge():
    at_limit = round(MAX_BAD_GLYPH_RATIO * 2000)
    assert judge(text_stats(visible_bad=at_limit)).good
    over = judge(text_stats(visible_bad=at_limit + 1))
    assert not over.good and "unmapped glyphs" in over.reason


def test_ocr_layer_share_edge():
    hidden = round(OCR_LAYER_SHARE * 2000)
    below = judge(text_stats(visible_chars=2000 - hidden + 1, hidden_chars=hidden - 1))
    assert below.good and not below.ocr_layer
    at = judge(text_stats(visible_chars=2000 - hidden, hidden_chars=hidden))
    assert at.ocr_layer and not at.good
    assert judge(text_stats(visible_chars=2000 - hidden, hidden_chars=hidden), trust_ocr_layer=True).good


def test_text_coverage_edge():
    # A 300 pt square page: the grid has 1 pt cells, so areas are exact.
    image = ((0, 0, 300, 300),)
    rows = round(MIN_TEXT_COVERAGE * 300)
    enough = judge(text_stats(width=300, height=300, visible_boxes=((0, 0, 300, rows),), image_boxes=image,
                              graphics=True))
    assert enough.good and enough.coverage == pytest.approx(MIN_TEXT_COVERAGE)
    short = judge(text_stats(width=300, height=300, visible_boxes=((0, 0, 300, rows - 1),), image_boxes=image,
                             graphics=True))
    assert not short.good and "text covers" in short.reason


def density_verdict(chars: int, rule: bool, size=A4):
    """The verdict on a page with ``chars`` characters of text, and a ruled line if ``rule``."""
    with pymupdf.open() as pdf:
        page = pdf.new_page(width=size[0], height=size[1])
        page.insert_text((20, 80), "x" * chars, fontsize=4)
        if rule:
            page.draw_line((20, 90), (size[0] - 20, 90))
        return assess_page(page)


def test_chars_per_page_area_edge():
    at_limit = density_verdict(MIN_CHARS_PER_A4, rule=True)
    assert at_limit.good and at_limit.chars == MIN_CHARS_PER_A4
    short = density_verdict(MIN_CHARS_PER_A4 - 1, rule=True)
    assert not short.good and f"fewer than the {MIN_CHARS_PER_A4} expected" in short.reason
    assert density_verdict(1, rule=False).good  # text is all the page draws: the layer is the whole page
    # The requirement scales with the page: a quarter of A4 needs a quarter of the characters.
    quarter = (A4[0] / 2, A4[1] / 2)
    assert density_verdict(MIN_CHARS_PER_A4 // 4, rule=True, size=quarter).good
    assert not density_verdict(MIN_CHARS_PER_A4 // 4 - 1, rule=True, size=quarter).good


def test_blank_page_is_good_and_a_picture_without_text_is_not():
    assert judge(text_stats(visible_chars=0, visible_boxes=(), drawn=False)).reason == "blank page"
    picture = judge(text_stats(visible_chars=0, visible_boxes=(), image_boxes=((0, 0, 100, 100),), graphics=True))
    assert not picture.good and picture.reason == "no text layer"
