"""The benchmark harness's quick mode runs end to end, so it cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "benchmarks" / "bench.py"
PROFILE = BENCH.with_name("profile_stages.py")


@pytest.mark.slow
def test_quick_benchmark(tiny_model, tmp_path):
    out = tmp_path / "bench.json"
    process = subprocess.run([sys.executable, str(BENCH), "--quick", "--model", str(tiny_model), "--out", str(out)],
                             capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr
    results = json.loads(out.read_text())
    assert json.loads(process.stdout) == results
    assert results["machine"]["cores"] >= 1 and results["settings"]["quick"] is True
    assert results["gguf_mb"]["F32"] > results["gguf_mb"]["Q4_K_M"] > 0
    for name, engine in results["engines"].items():
        assert "error" not in engine, (name, engine)
        assert engine["pages_per_min"] > 0 and engine["peak_rss_mb"] > 0, name
    assert {"ocrbatch-F16-vision-float32", "ocrbatch-Q4_K_M-vision-int8"} <= set(results["engines"])
    tokens, pages = results["settings"]["forced_output_tokens"], results["settings"]["pages"]
    for dtype in ("float32", "bfloat16"):
        reference = results["engines"][f"transformers-{dtype}"]
        assert reference["decode_tok_s_4_sequences"] > 0
        # Decoding one page's tokens and processing the page are timed in separate runs, so on a tiny model (tens of
        # milliseconds each) either can win; a factor of 10 still catches a rate in the wrong unit or over the wrong count.
        assert 0 < (tokens - 1) / reference["decode_tok_s"] < 10 * reference["process_s"] / pages, reference
    for quant, lm in results["language_model"].items():
        assert lm["prefill_tok_s"] > 0, quant
        assert lm["decode_tok_s"] > 0 and lm["decode_tok_s_4_sequences"] > 0 and lm["decode_tok_s_8_sequences"] > 0
    [fidelity] = results["fidelity"].values()
    rows = fidelity["vs_exact_pipeline"]
    assert set(rows) == {"F16", "Q8_0", "Q4_K_M", "vision-int8+F32", "vision-int8+Q4_K_M"}
    assert rows["F16"]["teacher_forced_top1_agreement"] >= 0.5
    for figures in rows.values():
        assert 0 <= figures["greedy_exact_match_rate"] <= 1
    assert set(results["ratios"]) >= {"pages_per_min_vs_transformers_fp32", "decode_tok_s_vs_transformers_fp32",
                                      "peak_rss_vs_transformers_fp32",
                                      "decode_tok_s_4_sequences_vs_transformers_fp32_batch_4"}
    measured = {k: v for k, v in results["ratios"].items() if k != "pages_per_min_vs_llama_cpp_mmproj"}
    assert None not in measured.values(), measured  # quick mode skips only the mmproj peer
    targets = results["targets"]
    assert targets.pop("faster than llama.cpp mmproj path") is None  # not measured in quick mode
    assert all(isinstance(v, bool) for v in targets.values())


@pytest.mark.slow
@pytest.mark.parametrize("stage, options", [("vision", ["--dtype", "int8", "--image-size", "224"]),
                                            ("decode", ["--quant", "F16", "--sequences", "2", "--image-size", "224",
                                                        "--tokens", "6", "--top", "1000"])])
def test_profile_names_where_time_goes(tiny_model, stage, options):
    process = subprocess.run([sys.executable, str(PROFILE), stage, "--model", str(tiny_model), *options],
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr
    report = json.loads(process.stdout)
    unit = "ms_per_page" if stage == "vision" else "ms_per_step"
    names = [entry["name"] for entry in report["top"]]
    # Each share is rounded to 3 decimals, so the listed shares may sum past 1 by half a thousandth each.
    assert report["measured_" + unit] > 0 and 0 < sum(e["share"] for e in report["top"]) <= 1 + 0.0005 * len(names)
    if stage == "vision":
        assert "aten::_int_mm" in names
    else:
        # llama.cpp's tensor names, layer numbers folded: proves the ggml_tensor layout is read right. Every group is
        # listed (--top 1000), so how the machine's load orders them cannot drop one.
        assert "result_output" in names and any(name.startswith("ffn_") for name in names), names


@pytest.mark.slow
def test_benchmark_runs_only_the_engines_asked_for(tiny_model, tmp_path):
    process = subprocess.run([sys.executable, str(BENCH), "--quick", "--model", str(tiny_model), "--skip-fidelity",
                              "--engines", "transformers-float32", "ocrbatch-Q4_K_M-vision-int8"],
                             capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr
    results = json.loads(process.stdout)
    assert set(results["engines"]) == {"transformers-float32", "ocrbatch-Q4_K_M-vision-int8"}
    assert "fidelity" not in results
    assert results["ratios"]["pages_per_min_vs_transformers_fp32"] > 0
    assert results["ratios"]["pages_per_min_vs_transformers_bf16"] is None
    assert results["ratios"]["fastest_float32_vision_config"] is None  # no float32-vision engine ran
    assert results["targets"]["pages_per_min >= 2.5x transformers bf16"] is None


@pytest.mark.slow
def test_quick_layout_benchmark(tiny_model, tmp_path):
    """Report pages (a text page, a figure page) through whole-page and CDLA layout mode, stitched and not, beside
    transformers on the whole pages and on the same blocks, at the same output tokens per page on average."""
    out = tmp_path / "layout.json"
    process = subprocess.run([sys.executable, str(BENCH), "--quick", "--model", str(tiny_model), "--layout", "none",
                              "cdla", "--vision-dtypes", "float32", "--stitch", "on", "off", "--out", str(out)],
                             capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr
    results = json.loads(out.read_text())
    settings, facts, engines = results["settings"], results["pages"], results["engines"]
    assert settings["papers"] == ["report-letter", "report-a4"] and settings["pages"] == 2
    assert facts["kinds"] == ["text", "figure"] and facts["tables"] == [1, 0], facts
    assert min(facts["model_blocks"]) >= 3, facts
    # Stitching fires on the figure page only: the text beside the chart joins the paragraph above it.
    assert facts["model_calls_stitched"][0] == facts["model_calls_unstitched"][0] == facts["model_blocks"][0]
    assert facts["model_calls_stitched"][1] < facts["model_calls_unstitched"][1] == facts["model_blocks"][1]
    assert facts["image_patches_stitched"][1] < facts["image_patches_unstitched"][1]
    for upscaled in facts["upscaling"].values():  # crops under the block minimum get more patches than their own
        assert upscaled["units"] > 0 and upscaled["patches"] > upscaled["patches_at_own_size"] > 0, upscaled
        assert 0 < upscaled["extra_patches_share_of_all"] < 1
    assert set(engines) == {"transformers-float32", "transformers-float32-layout-cdla",
                            "transformers-float32-layout-cdla-no-stitch", "ocrbatch-Q4_K_M-vision-float32-layout-none",
                            "ocrbatch-Q4_K_M-vision-float32-layout-cdla",
                            "ocrbatch-Q4_K_M-vision-float32-layout-cdla-no-stitch"}
    for name, engine in engines.items():
        assert "error" not in engine, (name, engine)
        assert engine["pages_per_min"] > 0, name
    whole = engines["ocrbatch-Q4_K_M-vision-float32-layout-none"]
    blocks = engines["ocrbatch-Q4_K_M-vision-float32-layout-cdla"]
    assert whole["output_tokens_per_page"] == [settings["page_tokens"]] * 2 and whole["blocks_per_page"] == 0
    assert blocks["blocks_by_prompt"]["Table Recognition:"] == 1 and blocks["layout_s_per_page"] > 0
    # Every model call decoded its share exactly (no early stop, no loop cut), so the totals only differ by rounding.
    assert blocks["output_tokens"] == settings["stitched_unit_tokens"] * blocks["model_calls_per_page"] * 2
    assert abs(blocks["output_tokens"] - whole["output_tokens"]) <= blocks["blocks_per_page"] * 2
    alone = engines["ocrbatch-Q4_K_M-vision-float32-layout-cdla-no-stitch"]
    assert alone["model_calls_per_page"] == alone["blocks_per_page"] == blocks["blocks_per_page"]
    assert blocks["model_calls_per_page"] < alone["model_calls_per_page"]
    assert alone["output_tokens"] == settings["block_tokens"] * alone["blocks_per_page"] * 2
    assert whole["model_calls_per_page"] == 1
    # Small crops are upscaled to the block minimum: more patches than the whole page.
    assert blocks["image_patches_per_page"] > whole["image_patches_per_page"]
    # The fair anchor made the same model calls on the same pixels as ocrbatch, and decoded as many tokens.
    for ours, mode in ((blocks, "stitched"), (alone, "unstitched")):
        anchor = engines["transformers-float32-layout-cdla" + ("" if mode == "stitched" else "-no-stitch")]
        for key in ("model_calls_per_page", "blocks_per_page", "image_patches_per_page", "output_tokens"):
            assert anchor[key] == ours[key], (mode, key, anchor[key], ours[key])
        assert ours["image_patches_per_page"] == sum(facts[f"image_patches_{mode}"]) / 2
    ratios = results["ratios"]["vision-float32"]
    assert ratios["pages_per_min_cdla_vs_transformers_fp32_same_blocks"] > 0
    assert ratios["pages_per_min_cdla_no_stitch_vs_transformers_fp32_same_blocks"] > 0
    assert ratios["cpu_s_per_page_transformers_fp32_same_blocks_vs_cdla"] > 0
    assert ratios["cdla_vs_whole_page"]["pages_per_min"] > 0
    for side in (ratios, results["ratios"]["transformers-float32"]):
        assert set(side["cdla_stitched_vs_not"]) == {"pages_per_min", "model_calls_per_page",
                                                     "image_patches_per_page", "cpu_s_per_page"}
        assert side["cdla_stitched_vs_not"]["model_calls_per_page"] < 1
