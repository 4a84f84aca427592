"""The job's output file: written in large row groups, shown only once whole."""

import pyarrow.parquet as pq

from ocrbatch.records.output import ROW_GROUP_ROWS, open_output


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"path": f"/docs/{i}.png", "doc_id": str(i), "page": 1, "status": "ok", "text": f"page {i}",
             "created_at": "2026-12-02T00:00:00+00:00"} for i in range(start, start + n)]


def test_parquet_rows_written_32_at_a_time_land_in_row_groups_of_the_set_size(tmp_path):
    """A row group per flush made the writer's metadata grow with every 32 pages of a long run."""
    out = open_output(tmp_path / "out.parquet")
    total = 2 * ROW_GROUP_ROWS + 452
    for start in range(0, total, 32):
        out.write(rows(min(32, total - start), start))
    assert not (tmp_path / "out.parquet").exists()  # nothing shown before the end
    out.commit()
    metadata = pq.ParquetFile(tmp_path / "out.parquet").metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [
        ROW_GROUP_ROWS, ROW_GROUP_ROWS, 452]
    assert [r["doc_id"] for r in pq.read_table(tmp_path / "out.parquet").to_pylist()] == [str(i) for i in range(total)]


def test_an_aborted_output_leaves_neither_file(tmp_path):
    out = open_output(tmp_path / "out.parquet")
    out.write(rows(10))
    out.abort()
    assert list(tmp_path.iterdir()) == []
