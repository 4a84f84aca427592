"""The job's own ceiling (benchmarks/ceiling.py) in quick form: 10,000 tiny pages, parent RSS bounded.

Speed is the benchmark's business; this asserts only what a load on the
machine cannot change: every page done, the re-run doing nothing, and the
parent's memory not growing with the pages.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "benchmarks" / "ceiling.py"
# RSS at 100 % of the pages (after the output is committed) minus RSS at 25 %, over 7,500 pages.
# Measured 24 MB with a Parquet row group every 32 rows, 1.6 MB since row groups hold 1,024 rows
# (allocator noise). A leak of 2 KB a page (a kept row, image or dict per page) adds 7,500 × 2 KB
# = 15 MB and breaks this bound; so did the small row groups.
RSS_GROWTH_BOUND_MB = 12


@pytest.mark.slow
def test_ceiling_quick_parent_rss_does_not_grow_with_pages(tmp_path):
    out = tmp_path / "ceiling.json"
    process = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out)], capture_output=True,
                             text=True, timeout=1800)
    assert process.returncode == 0, process.stderr[-3000:]
    [run] = json.loads(out.read_text())["runs"]
    assert run["pages"] == 10000 and run["pages_per_s"] > 0
    rss = run["parent_rss_mb_at_done"]
    assert None not in rss.values(), rss  # the sampler saw every fraction of the pages done
    assert rss["100%"] - rss["25%"] < RSS_GROWTH_BOUND_MB, rss
