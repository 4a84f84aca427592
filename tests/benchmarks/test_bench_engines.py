"""The engines benchmark's quick mode runs end to end, so it cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "benchmarks" / "bench_engines.py"


@pytest.mark.slow
def test_quick_engines_benchmark(tiny_model, tmp_path):
    out = tmp_path / "engines.json"
    process = subprocess.run([sys.executable, str(BENCH), "--quick", "--model", str(tiny_model), "--modes", "local",
                              "ray", "openai", "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert process.returncode == 0, process.stderr
    results = json.loads(out.read_text())
    assert results["settings"]["pages"] == 2 and results["settings"]["output_tokens_per_page"] == 8
    runs = results["runs"]
    assert set(runs) == {"local", "ray", "openai"}
    for mode, run in runs.items():
        assert "error" not in run, (mode, run)
        assert run["output_tokens_per_page"] == [8, 8], mode  # forced through every engine and over HTTP
        assert results["checks"][f"{mode}: every page decoded exactly the forced tokens"] is True
    assert runs["ray"]["nodes"]["vision"] == 1 and runs["ray"]["pages_ok"] == 2
    assert runs["openai"]["server_cpu_s_per_page"] > 0 and runs["openai"]["image_tokens_per_page"]
    ratios = results["ratios"]
    assert ratios["ray_vs_local_whole_process"] > 0 and ratios["openai_vs_local_pages_only"] > 0
    assert ratios["ray_2_nodes_vs_ray_1_node"] is None  # not run
    for mode in ("local", "ray"):  # when the rows finished, from the job's call
        run = runs[mode]
        assert 0 < run["first_row_s_from_job_start"] <= run["last_row_s_from_job_start"] < run["wall_s"], mode
        assert len(run["rows_finished_s_from_process_start"]) == 2, mode
