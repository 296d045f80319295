"""ParquetParts (ovseg_mine.publish.parquet): files and row groups bounded in bytes, output independent of how the
rows arrive, an empty split, and no partial file left after an error."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ovseg_mine.publish.parquet import ParquetParts

SCHEMA = pa.schema([pa.field("i", pa.int64()), pa.field("text", pa.string())])


def _rows(n: int, start: int = 0) -> pa.Table:
    return pa.table({"i": list(range(start, start + n)), "text": [f"row {k:06d}" * 4 for k in range(start, start + n)]})


def _write(folder, tables, **limits):
    folder.mkdir()
    parts = ParquetParts(folder, SCHEMA, **limits)
    for table in tables:
        parts.write(table.cast(SCHEMA))
    return parts, parts.close()


def test_files_and_row_groups_are_bounded_and_independent_of_the_input_split(tmp_path):
    row_bytes = _rows(100).nbytes / 100
    limits = dict(max_file_bytes=int(60 * row_bytes), max_row_group_bytes=int(25 * row_bytes))
    parts, files = _write(tmp_path / "a", [_rows(100), _rows(150, 100)], **limits)
    assert parts.rows == 250 and parts.num_bytes == _rows(100).nbytes + _rows(150, 100).nbytes
    assert [f.name for f in files] == [f"train-{i:05d}-of-{len(files):05d}.parquet" for i in range(len(files))]
    groups = [
        pq.ParquetFile(f).metadata.row_group(g).num_rows for f in files for g in range(pq.ParquetFile(f).num_row_groups)
    ]
    assert groups[:-1] == [25] * (len(groups) - 1) and sum(groups) == 250  # full groups of 25 rows, then the rest
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [75, 75, 75, 25]  # a file closes past 60 rows
    assert pq.read_table(files).column("i").to_pylist() == list(range(250))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [f.name for f in files]  # no .tmp left

    _, again = _write(tmp_path / "b", [_rows(7, k) for k in range(0, 245, 7)] + [_rows(5, 245)], **limits)
    assert [f.read_bytes() for f in again] == [f.read_bytes() for f in files]


def test_empty_split_gives_one_empty_file(tmp_path):
    parts, files = _write(tmp_path / "e", [])
    assert len(files) == 1 and pq.read_table(files[0]).num_rows == 0 and parts.rows == 0
    assert parts.close() == files  # closing twice changes nothing


def test_an_error_leaves_no_partial_file(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(RuntimeError), ParquetParts(tmp_path / "x", SCHEMA, max_row_group_bytes=1) as parts:
        parts.write(_rows(10).cast(SCHEMA))
        raise RuntimeError("stop")
    assert list((tmp_path / "x").iterdir()) == []
