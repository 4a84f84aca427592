"""Block outputs → Markdown (OTSL tables, formulas, headings, pages, documents), PaddleX's
passes after recognition (LaTeX delimiters, formula numbers, title levels, figures inside
tables, tables continued across pages) and the repetition guard that cuts looping outputs
while they are decoded."""

from __future__ import annotations

import random

import pytest
from PIL import Image, ImageDraw

from ocrbatch.layout.blocks import Block
from ocrbatch.layout.markdown import (
    DocumentPage,
    block_markdown,
    document_markdown,
    heading_level,
    image_filename,
    normalise_formula,
    normalise_math,
    page_markdown,
)
from ocrbatch.layout.tables import FIGURE_MIN_SIDE, figure_tokens, otsl_to_html, paint_figure_tokens
from ocrbatch.model.repetition import PROSE, TABLE, LoopSettings, RepetitionGuard, cut_repetition, guard_for


def block(label: str, order: int = 0) -> Block:
    return Block(order, label, 0.9, 10.0, 20.0, 110.0, 70.0)


def placed(label: str, order: int, x0: float, y0: float, x1: float, y1: float) -> Block:
    return Block(order, label, 0.9, float(x0), float(y0), float(x1), float(y1))


# ------------------------------------------------------------------ OTSL

def test_otsl_plain_grid():
    html = otsl_to_html("<fcel>Item<fcel>Qty<nl><fcel>Toner<fcel>3<nl>")
    assert html == "<table><tr><td>Item</td><td>Qty</td></tr><tr><td>Toner</td><td>3</td></tr></table>"


def test_otsl_column_and_row_spans():
    # A header cell over two columns, a row label over two rows, an empty cell.
    text = ("<fcel>Region<fcel>Sales<lcel><nl>"
            "<fcel>North<fcel>Q1<fcel>Q2<nl>"
            "<ucel><fcel>10<ecel><nl>")
    assert otsl_to_html(text) == (
        "<table>"
        '<tr><td>Region</td><td colspan="2">Sales</td></tr>'
        '<tr><td rowspan="2">North</td><td>Q1</td><td>Q2</td></tr>'
        "<tr><td>10</td><td></td></tr>"
        "</table>")


def test_otsl_block_span_with_xcel():
    text = "<fcel>A<lcel><fcel>B<nl><ucel><xcel><fcel>C<nl><fcel>D<fcel>E<fcel>F<nl>"
    assert otsl_to_html(text) == (
        '<table><tr><td rowspan="2" colspan="2">A</td><td>B</td></tr>'
        "<tr><td>C</td></tr>"
        "<tr><td>D</td><td>E</td><td>F</td></tr></table>")


def test_otsl_ragged_rows_missing_final_nl_whitespace_and_escaping():
    text = "\n<fcel> a < b <fcel>x<fcel>y<nl>\n<fcel>R&D"
    assert otsl_to_html(text) == (
        "<table><tr><td>a &lt; b</td><td>x</td><td>y</td></tr>"
        "<tr><td>R&amp;D</td><td></td><td></td></tr></table>")


def test_otsl_merge_tag_with_nothing_to_merge_becomes_a_cell():
    assert otsl_to_html("<lcel>x<fcel>y<nl><ucel><fcel>z<nl>") == (
        '<table><tr><td rowspan="2">x</td><td>y</td></tr><tr><td>z</td></tr></table>')


@pytest.mark.parametrize("text", [
    "",
    "Item Qty Total",
    "| a | b |\n|---|---|",
    "<table><tr><td>1</td></tr></table>",
    "Table 3: <fcel>1<fcel>2<nl>",  # prose before the first tag
    "<lcel><ucel><nl><xcel>",        # no cell ever opens
    "<nl><nl>",
])
def test_otsl_that_does_not_parse(text):
    assert otsl_to_html(text) is None


def test_table_block_falls_back_to_raw_text():
    assert block_markdown(block("table"), "Item Qty\nToner 3") == "Item Qty\nToner 3"
    assert block_markdown(block("table"), "<fcel>1<nl>").startswith("<table><tr><td>1</td>")


# -------------------------------------------------------------- formulas

@pytest.mark.parametrize("raw", ["E = mc^2", "$$E = mc^2$$", "\\[E = mc^2\\]", " \\( E = mc^2 \\) ", "$E = mc^2$",
                                 "$$ \\[ E = mc^2 \\] $$"])
def test_formulas_are_wrapped_once(raw):
    assert normalise_formula(raw, display=True) == "$$\nE = mc^2\n$$"
    assert normalise_formula(raw, display=False) == "$E = mc^2$"


def test_formula_edge_cases():
    assert normalise_formula("", display=True) == ""
    assert normalise_formula("$$ $$", display=True) == ""
    # Dollars inside the formula body stay.
    assert normalise_formula("\\text{cost in \\$}", display=False) == "$\\text{cost in \\$}$"


def test_math_in_running_text():
    text = "Energy \\( E = mc^2 \\) and \\[ a^2 + b^2 = c^2 \\] hold; $x$ stays."
    assert normalise_math(text) == "Energy $E = mc^2$ and $$a^2 + b^2 = c^2$$ hold; $x$ stays."


def test_formula_blocks():
    assert block_markdown(block("display_formula"), "\\[x^2\\]") == "$$\nx^2\n$$"
    assert block_markdown(block("inline_formula"), "x^2") == "$x^2$"
    assert block_markdown(block("formula"), "x^2") == "$$\nx^2\n$$"


# -------------------------------------------------------------- headings

@pytest.mark.parametrize("title, level", [
    ("Introduction", 2), ("3 Results", 2), ("3. Results", 2), ("2.1 Scope", 3), ("2.1. Scope", 3),
    ("A.1.2 Data", 4), ("B. Annex", 2), ("1.2.3.4.5.6 Deep", 6), ("1.5x faster parsing", 2), ("Version 2.1 notes", 2),
])
def test_heading_levels_from_numbering(title, level):
    assert heading_level(title) == level


def test_titles_become_headings():
    assert block_markdown(block("doc_title"), "Annual\nreport") == "# Annual report"
    assert block_markdown(block("paragraph_title"), "2.1 Hyphen-\nated scope") == "### 2.1 Hyphenated scope"


# ----------------------------------------------------------- other kinds

def test_images_link_to_their_crops():
    assert block_markdown(block("image"), "", image_link="doc_images/p1.png") == "![image](doc_images/p1.png)"
    assert block_markdown(block("image"), "") == ""
    assert block_markdown(block("chart"), "", image_link="c.png") == "![chart](c.png)"


def test_recognised_chart_becomes_a_markdown_table():
    assert block_markdown(block("chart"), "Year | Sales\n2023 | 4\n2024 | 7") == (
        "| Year | Sales |\n| --- | --- |\n| 2023 | 4 |\n| 2024 | 7 |")


def test_text_blocks():
    assert block_markdown(block("text"), "First line.\nSecond line.\n\n") == "First line.\n\nSecond line."
    assert block_markdown(block("content"), "1 Intro .... 1\n2 Method .... 4") == "1 Intro .... 1  \n2 Method .... 4"
    assert block_markdown(block("text"), "   ") == ""


# ------------------------------------------------------------ pages, docs

def test_page_markdown_orders_blocks_and_leaves_out_furniture():
    items = [
        (block("text", 3), "Second paragraph."),
        (block("header", 0), "Journal of Things"),
        (block("doc_title", 1), "A Title"),
        (block("text", 2), "First paragraph."),
        (block("image", 4), "", "imgs/figure.png"),
        (block("footnote", 5), "1 A footnote."),
        (block("number", 6), "7"),
        (block("footer", 7), "Page 7"),
        (block("text", 8), ""),
    ]
    assert page_markdown(items) == (
        "# A Title\n\nFirst paragraph.\n\nSecond paragraph.\n\n![image](imgs/figure.png)")


def test_document_markdown_across_pages():
    pages = [DocumentPage(2, "Page two text."), DocumentPage(1, "# Title\n\nPage one."), DocumentPage(3, ""),
             DocumentPage(4, "recorded, not used", [(block("text", 0), "Written from its blocks.")])]
    assert document_markdown(pages) == (
        "<!-- page 1 -->\n\n# Title\n\nPage one.\n\n"
        "<!-- page 2 -->\n\nPage two text.\n\n"
        "<!-- page 3 -->\n\n"
        "<!-- page 4 -->\n\nWritten from its blocks.\n")
    assert document_markdown([]) == ""


def test_image_filenames_are_unique_per_page_and_block():
    names = {image_filename(page, block("image", order)) for page in (1, 2) for order in (0, 1)}
    assert len(names) == 4
    assert image_filename(12, block("header_image", 3)) == "page0012-block003-header_image.png"


# ------------------------------------------- PaddleX's passes after recognition

def test_latex_delimiters_become_dollars_in_every_kind_of_block():
    assert block_markdown(block("paragraph_title"), "2.1 The \\(\\alpha\\) term") == "### 2.1 The $\\alpha$ term"
    assert block_markdown(block("doc_title"), "On \\(n\\)-grams") == "# On $n$-grams"
    assert block_markdown(block("table"), "<fcel>\\(x^2\\)<fcel>\\[y\\]<nl>") == (
        "<table><tr><td>$x^2$</td><td>$$y$$</td></tr></table>")
    assert block_markdown(block("content"), "1 On \\(\\beta\\) .... 3") == "1 On $\\beta$ .... 3"
    assert block_markdown(block("figure_title"), "Figure 2: \\(f(x)\\)") == "Figure 2: $f(x)$"


def test_a_formula_number_is_folded_into_the_formula_before_it():
    items = [
        (block("text", 0), "Einstein wrote"),
        (block("display_formula", 1), "\\[E = mc^2\\]"),
        (block("formula_number", 2), "(3)"),
        (block("display_formula", 3), "a = b"),  # no number follows it
        (block("formula_number", 5), "$(4)$"),  # follows a paragraph, not a formula: left out
        (block("text", 4), "and more."),
    ]
    assert page_markdown(items) == (
        "Einstein wrote\n\n$$\nE = mc^2 \\tag*{(3)}\n$$\n\n$$\na = b\n$$\n\nand more.")
    assert normalise_formula("x", display=True, number="\\((5)\\)") == "$$\nx \\tag*{(5)}\n$$"
    assert normalise_formula("x", display=False, number="(5)") == "$x$"


def title(order: int, height: float, label: str = "paragraph_title") -> Block:
    return placed(label, order, 50, 100 * order, 500, 100 * order + height)


def test_unnumbered_titles_take_their_level_from_their_height():
    items = [
        (title(0, 40), "Annual report"),
        (title(1, 24), "Summary"),
        (block("text", 2), "Body."),
        (title(3, 25), "Outlook"),  # a pixel taller: the same type size
        (title(4, 48), "A heading set\nover two lines"),  # 24 pixels a line
        (title(5, 14), "Remarks"),
    ]
    assert page_markdown(items).split("\n\n") == [
        "## Annual report", "### Summary", "Body.", "### Outlook", "### A heading set over two lines",
        "#### Remarks"]


def test_numbering_comes_first_and_sizes_the_unnumbered_titles_beside_it():
    items = [
        (title(0, 40), "Annual report"),
        (title(1, 24), "1 Scope"),
        (title(2, 24), "Background"),  # the size of the numbered top-level titles
        (title(3, 18), "1.1 Terms"),
        (title(4, 18), "Notes"),
        (title(5, 24), "2 Costs"),
        (title(6, 24), "2.1 Set as large as its parent"),  # numbering wins over height
        (title(7, 12), "Remark"),  # smaller than every numbered size: one level below the smallest
        (title(8, 30, "doc_title"), "The document title"),
    ]
    assert page_markdown(items).split("\n\n") == [
        "## Annual report", "## 1 Scope", "## Background", "### 1.1 Terms", "### Notes", "## 2 Costs",
        "### 2.1 Set as large as its parent", "#### Remark", "# The document title"]


def test_a_document_sizes_its_titles_over_all_its_pages():
    first = DocumentPage(1, "", [(title(0, 40), "Annual report"), (block("text", 1), "Intro.")])
    second = DocumentPage(2, "", [(title(0, 24), "Costs"), (block("text", 1), "Up.")])
    # Alone, page 2's only title is its page's tallest ...
    assert page_markdown(second.items) == "## Costs\n\nUp."
    # ... in the document it is a size below the report's title.
    assert "### Costs" in document_markdown([first, second])


def test_figures_inside_a_table_become_image_links_in_its_cells():
    table = placed("table", 0, 100, 100, 700, 400)
    logo = placed("image", 1, 450, 150, 550, 250)
    tiny = placed("image", 2, 600, 300, 610, 310)  # under FIGURE_MIN_SIDE: no token, but inside the table
    outside = placed("image", 3, 100, 500, 300, 700)
    tokens = figure_tokens(table, [table, logo, tiny, outside])
    assert list(tokens) == ["[F2]"] and tokens["[F2]"] is logo
    items = [(table, "<fcel>Brand<fcel>[F2]<nl><fcel>[F7]<fcel>x<nl>"), (logo, "", "doc-images/logo.png"),
             (tiny, "", "doc-images/tiny.png"), (outside, "", "doc-images/chart.png")]
    assert page_markdown(items) == (
        '<table><tr><td>Brand</td><td><img src="doc-images/logo.png"></td></tr>'
        "<tr><td>[F7]</td><td>x</td></tr></table>\n\n"  # a token that is not one of ours stays
        "![image](doc-images/chart.png)")
    # Without saved crops (no --markdown-dir) the token is dropped, as a picture without a file is.
    assert page_markdown([(table, "<fcel>Brand<fcel>[F2]<nl>"), (logo, "")]) == (
        "<table><tr><td>Brand</td><td></td></tr></table>")


def test_figures_inside_a_table_are_painted_over_with_their_token():
    page = Image.new("RGB", (800, 500), "white")
    ImageDraw.Draw(page).rectangle((450, 150, 550, 250), fill="black")  # the logo inside the table
    ImageDraw.Draw(page).rectangle((100, 420, 300, 480), fill="black")  # a picture outside it
    table, logo = placed("table", 0, 100, 100, 700, 400), placed("image", 1, 450, 150, 551, 251)
    outside = placed("image", 2, 100, 420, 301, 481)
    painted = paint_figure_tokens(page, table, [table, logo, outside])
    figure = painted.crop((450, 150, 551, 251)).convert("L")
    dark = sum(value < 128 for value in figure.getdata())
    assert 0 < dark < 0.5 * figure.width * figure.height  # white, with the token written on it
    assert painted.crop((100, 420, 301, 481)).getcolors() == [(201 * 61, (0, 0, 0))]  # untouched
    assert page.getpixel((500, 200)) == (0, 0, 0)  # the page itself is not changed
    empty = placed("table", 3, 0, 0, 90, 90)
    assert paint_figure_tokens(page, empty, [table, logo, outside, empty]) is page  # no figure in it: no copy
    assert FIGURE_MIN_SIDE == 25


# ------------------------------------------------ tables across pages

HEADER = "<fcel>Item<fcel>Qty<nl>"


def table_page(number: int, rows: str, before=(), after=(), box=(50, 300, 550, 700)) -> DocumentPage:
    blocks = [(block(label, order), text) for order, (label, text) in enumerate(before)]
    blocks.append((placed("table", len(blocks), *box), rows))
    blocks += [(block(label, len(blocks) + k), text) for k, (label, text) in enumerate(after)]
    return DocumentPage(number, "", blocks)


def test_a_table_continued_on_the_next_page_is_merged_without_its_repeated_header():
    pages = [
        table_page(1, HEADER + "<fcel>Toner<fcel>3<nl>", before=[("text", "Orders:")], after=[("footer", "Page 1")]),
        table_page(2, HEADER + "<fcel>Paper<fcel>5<nl>", before=[("header", "Report"), ("number", "2")],
                   after=[("text", "Signed.")], box=(52, 80, 546, 300)),  # 1.2 % narrower
    ]
    assert document_markdown(pages) == (
        "<!-- page 1 -->\n\nOrders:\n\n<table><tr><td>Item</td><td>Qty</td></tr><tr><td>Toner</td><td>3</td></tr>"
        "<tr><td>Paper</td><td>5</td></tr></table>\n\n"
        "<!-- page 2 -->\n\nSigned.\n")


def test_a_table_over_three_pages_ends_up_whole_on_the_first():
    pages = [table_page(n, HEADER + f"<fcel>row {n}<fcel>{n}<nl>") for n in (1, 2, 3)]
    markdown = document_markdown(pages)
    assert markdown.count("<table>") == 1 and markdown.count("<td>Item</td>") == 1
    assert markdown.index("row 1") < markdown.index("row 2") < markdown.index("row 3") < markdown.index("page 2")


@pytest.mark.parametrize("second", [
    table_page(2, HEADER + "<fcel>Paper<fcel>5<nl>", box=(50, 80, 610, 300)),  # 12 % wider
    table_page(2, "<fcel>Paper<fcel>5<fcel>EUR<nl>"),  # three columns
    table_page(2, HEADER + "<fcel>Paper<fcel>5<nl>", before=[("paragraph_title", "Annex")]),  # a title first
    table_page(2, "Paper 5"),  # not OTSL
])
def test_tables_that_do_not_continue_each_other_stay_apart(second):
    first = table_page(1, HEADER + "<fcel>Toner<fcel>3<nl>", after=[("footer", "Page 1")])
    assert document_markdown([first, second]).count("<!-- page 2 -->\n\n") == 1
    merged = document_markdown([first, second]).split("<!-- page 2 -->")[1]
    assert "Paper" in merged


def test_text_after_the_first_table_keeps_the_tables_apart():
    first = table_page(1, HEADER + "<fcel>Toner<fcel>3<nl>", after=[("text", "Total: 3")])
    second = table_page(2, HEADER + "<fcel>Paper<fcel>5<nl>")
    assert document_markdown([first, second]).split("<!-- page 2 -->")[1].count("<table>") == 1


def recorded(order: int, label: str, text: str, box=(50, 300, 550, 700)) -> dict:
    """A block as the output row's ``blocks`` column has it."""
    x0, y0, x1, y1 = box
    return {"order": order, "label": label, "score": 0.9, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
            "prompt": "", "text": text, "n_image_tokens": 0, "n_output_tokens": 0, "finish_reason": "stop",
            "group": order}


def test_the_markdown_file_is_written_from_the_recorded_blocks_of_the_whole_document(tmp_path):
    from ocrbatch.records.recorder import markdown_images_folder, write_markdown
    from ocrbatch.records.sqlite import Store

    store = Store(tmp_path / "job.ocrbatch.db")
    doc_id, path = "d" * 32, tmp_path / "report.pdf"
    store.upsert_document(doc_id, path)
    store.set_page_count(doc_id, 4)
    first = [recorded(0, "text", "Orders:", (50, 100, 550, 150)), recorded(1, "image", "", (50, 160, 150, 290)),
             recorded(2, "table", HEADER + "<fcel>Toner<fcel>3<nl>"),
             recorded(3, "footer", "Page 1", (50, 770, 550, 790))]
    second = [recorded(0, "table", HEADER + "<fcel>Paper<fcel>5<nl>", (50, 80, 550, 300))]
    store.record_page(doc_id, 1, "ok", {"page": 1, "text": "as the page had it", "blocks": first})
    store.record_page(doc_id, 2, "ok", {"page": 2, "text": "as the page had it", "blocks": second})
    store.record_page(doc_id, 3, "failed", {"page": 3, "text": "", "error": "out of memory"}, "out of memory")
    store.record_page(doc_id, 4, "ok", {"page": 4, "text": "From the text layer.", "blocks": []})
    folder = tmp_path / "md"
    images = markdown_images_folder(folder, path, doc_id)
    images.mkdir(parents=True)
    (images / image_filename(1, block("image", 1))).write_bytes(b"png")
    markdown = write_markdown(store, doc_id, folder).read_text()
    assert markdown == (
        f"<!-- page 1 -->\n\nOrders:\n\n![image]({images.name}/page0001-block001-image.png)\n\n"
        "<table><tr><td>Item</td><td>Qty</td></tr><tr><td>Toner</td><td>3</td></tr>"
        "<tr><td>Paper</td><td>5</td></tr></table>\n\n"
        "<!-- page 2 -->\n\n"
        "<!-- page 3 -->\n\n<!-- page 3 failed: out of memory -->\n\n"
        "<!-- page 4 -->\n\nFrom the text layer.\n")


# ------------------------------------------------------- repetition guard

def push_all(guard: RepetitionGuard, tokens: list[int]) -> tuple[int, int] | None:
    """(tokens pushed when the guard fired, tokens to keep), or None if it never fired."""
    for n, token in enumerate(tokens, start=1):
        keep = guard.push(token)
        if keep is not None:
            return n, keep
    return None


def test_no_loop_in_varied_output():
    rng = random.Random(0)
    tokens = [rng.randrange(1000) for _ in range(5000)]
    assert push_all(RepetitionGuard(), tokens) is None


def test_single_token_loop_is_cut_after_one_copy():
    prefix = [11, 12, 13, 14]
    fired = push_all(RepetitionGuard(), prefix + [7] * 1000)
    # Fires once the run covers min_tokens (200) tokens; keeps the prefix and one 7.
    assert fired == (len(prefix) + PROSE.min_tokens, len(prefix) + 1)


def test_sentence_loop_is_cut_after_its_first_copy():
    prefix = list(range(100, 160))
    sentence = list(range(500, 537))  # 37 tokens
    fired = push_all(RepetitionGuard(), prefix + sentence * 40)
    assert fired is not None
    pushed, keep = fired
    assert keep == len(prefix) + len(sentence)
    # Five copies (185 tokens) are not enough: the loop must also cover 200 tokens.
    assert pushed == len(prefix) + PROSE.min_tokens


def test_a_cycle_starting_inside_the_prefix_is_cut_at_the_first_full_cycle():
    # "x a b" then "c a b" repeated: the loop's cycle is a-b-c from the first a.
    tokens = [1, 2, 3] + [4, 2, 3] * 100
    kept, cut = cut_repetition(tokens, LoopSettings(max_period=8, min_repeats=5, min_tokens=30))
    assert cut and kept == [1, 2, 3, 4]


def test_smallest_cycle_wins():
    kept, cut = cut_repetition([9] + [1, 2] * 200)
    assert cut and kept == [9, 1, 2]


def test_short_legitimate_repeats_pass():
    # A dotted leader, three identical table rows, a short refrain.
    assert push_all(RepetitionGuard(), [5] + [8] * 120 + [6]) is None
    row = [40, 41, 42, 41, 43, 41, 44, 45]
    assert push_all(RepetitionGuard(), row * 4 + [1, 2, 3]) is None
    assert push_all(RepetitionGuard(), [1, 2, 3] * 5) is None


def test_tables_get_looser_settings():
    ecel, nl = 300, 301
    empty_form = ([ecel] * 10 + [nl]) * 20  # a 20 x 10 grid of empty cells: 220 tokens
    assert push_all(guard_for("OCR:"), empty_form) is not None
    assert push_all(guard_for("Table Recognition:"), empty_form) is None
    assert guard_for("Table Recognition:").settings == TABLE
    looping_table = [ecel, 5, nl] * 1000
    assert push_all(guard_for("Table Recognition:"), looping_table) is not None


def test_cycles_longer_than_max_period_are_not_seen():
    cycle = list(range(50))
    settings = LoopSettings(max_period=40, min_repeats=3, min_tokens=100)
    assert push_all(RepetitionGuard(settings), cycle * 10) is None
    assert push_all(RepetitionGuard(LoopSettings(max_period=50, min_repeats=3, min_tokens=100)), cycle * 10) is not None


def test_cut_repetition_matches_the_guard_and_leaves_clean_output_alone():
    tokens = [3, 1, 4, 1, 5, 9, 2, 6] + [2, 7] * 300
    kept, cut = cut_repetition(tokens)
    fired = push_all(RepetitionGuard(), tokens)
    assert cut and kept == tokens[:fired[1]]
    assert cut_repetition([1, 2, 3]) == ([1, 2, 3], False)


def test_settings_are_checked():
    with pytest.raises(ValueError):
        LoopSettings(min_repeats=1)
    with pytest.raises(ValueError):
        LoopSettings(max_period=0)
