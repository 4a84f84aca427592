"""Block outputs → Markdown (OTSL tables, formulas, headings, pages, documents) and the
repetition guard that cuts looping outputs while they are decoded."""

from __future__ import annotations

import random

import pytest

from ocrbatch.layout import Block
from ocrbatch.markdown import (
    block_markdown,
    document_markdown,
    heading_level,
    image_filename,
    normalise_formula,
    normalise_math,
    otsl_to_html,
    page_markdown,
)
from ocrbatch.repetition import PROSE, TABLE, LoopSettings, RepetitionGuard, cut_repetition, guard_for


def block(label: str, order: int = 0) -> Block:
    return Block(order, label, 0.9, 10.0, 20.0, 110.0, 70.0)


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
    ("A.1.2 Data", 4), ("1.2.3.4.5.6 Deep", 6), ("1.5x faster parsing", 2), ("Version 2.1 notes", 2),
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
    pages = [(2, "Page two text."), (1, "# Title\n\nPage one."), (3, "")]
    assert document_markdown(pages) == (
        "<!-- page 1 -->\n\n# Title\n\nPage one.\n\n"
        "<!-- page 2 -->\n\nPage two text.\n\n"
        "<!-- page 3 -->\n")
    assert document_markdown([]) == ""


def test_image_filenames_are_unique_per_page_and_block():
    names = {image_filename(page, block("image", order)) for page in (1, 2) for order in (0, 1)}
    assert len(names) == 4
    assert image_filename(12, block("header_image", 3)) == "page0012-block003-header_image.png"


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
