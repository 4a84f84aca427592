"""The --pdf-text benchmark's quick mode runs end to end, so it cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "benchmarks" / "bench_pdf_text.py"


@pytest.mark.slow
def test_quick_pdf_text_benchmark(tiny_model, tmp_path):
    out = tmp_path / "bench.json"
    process = subprocess.run([sys.executable, str(BENCH), "--quick", "--model", str(tiny_model), "--out", str(out)],
                             capture_output=True, text=True, timeout=900, check=False)
    assert process.returncode == 0, process.stderr
    results = json.loads(out.read_text())
    assert json.loads(process.stdout) == results
    settings = results["settings"]
    assert settings["quick"] is True and results["machine"]["cores"] >= 1
    assert (settings["pages"], settings["born_digital_pages"], settings["scanned_pages"]) == (4, 2, 2)
    assert any(set(d["pages"]) == {"text", "scan"} for d in settings["documents"])  # a mixed document
    assert {d["paper"] for d in settings["documents"]} == {"letter", "a4"}

    never, auto = results["runs"]["never"], results["runs"]["auto"]
    for run in (never, auto):
        assert "error" not in run, run
        assert run["pages"] == run["pages_ok"] == 4 and run["pages_failed"] == 0 and not run["errors"]
        assert run["pages_per_min"] > 0 and run["process_s"] > 0
        assert run["output_tokens_per_model_page"] == [settings["forced_output_tokens"]]
    assert (never["pages_from_model"], never["pages_from_text_layer"]) == (4, 0)
    assert (auto["pages_from_model"], auto["pages_from_text_layer"]) == (2, 2) == (
        settings["scanned_pages"], auto["summary_pages_text_layer"])
    # The text layer took exactly the born-digital pages, in every document.
    born_digital = sorted([d["name"], number + 1] for d in settings["documents"]
                          for number, kind in enumerate(d["pages"]) if kind == "text")
    assert sorted([name, page] for name, page, source in auto["routes"] if source == "text-layer") == born_digital
    assert auto["text_layer_chars_per_page"] > 500  # a full report page, not a stub

    assert all(results["checks"].values()), results["checks"]
    ratios = results["ratios"]
    assert ratios["pages_per_min_auto_vs_never"] == pytest.approx(auto["pages_per_min"] / never["pages_per_min"],
                                                                  abs=0.002)
    assert ratios["pages_per_min_auto_vs_never"] > 0 and ratios["pages_per_cpu_s_auto_vs_never"] > 0
    assert ratios["ideal_if_text_layer_free"] == 2.0
    for run in (never, auto):
        assert 0 < run["cpu_s"] <= run["process_s"] * results["machine"]["cores"] + 1  # no more than every core
    assert set(results["pages_per_min"]) == {"never", "auto", "never_from_cpu_time", "auto_from_cpu_time"}
    text_layer = results["text_layer"]
    assert "error" not in text_layer, text_layer
    assert text_layer["pages_timed"] >= 1 and 0 < text_layer["s_per_page"] < 60
