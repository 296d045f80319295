"""Parquet files of a published dataset, split as ``datasets.push_to_hub`` splits them.

:class:`ParquetParts` takes Arrow tables in and writes numbered Parquet files out: at most ``max_file_bytes``
per file and ``max_row_group_bytes`` per row group (uncompressed Arrow bytes, datasets' ``MAX_SHARD_SIZE`` and
row group size), zstd, with a page index and, on pyarrow >= 21, content-defined chunking so that a rebuilt file
keeps its pages and the Hub's Xet storage dedupes a re-upload. The output depends only on the rows given, not
on how they were split into tables: the same rows give byte-identical files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

MAX_FILE_BYTES = 500 * 1000**2  # uncompressed Arrow bytes per Parquet file (datasets' MAX_SHARD_SIZE)
MAX_ROW_GROUP_BYTES = 100 * 1000**2  # uncompressed Arrow bytes per row group (datasets' MAX_ROW_GROUP_SIZE)
CDC_OPTIONS = {"min_chunk_size": 256 * 1024, "max_chunk_size": 1024 * 1024, "norm_level": 0}


def has_cdc() -> bool:
    """True when this pyarrow's ``ParquetWriter`` has content-defined chunking (pyarrow >= 21)."""
    import inspect

    import pyarrow.parquet as pq

    return "use_content_defined_chunking" in inspect.signature(pq.ParquetWriter.__init__).parameters


class ParquetParts:
    """A buffered writer of a split into Parquet files of bounded size.

    Args:
        folder: where the files go (it must exist).
        schema: the Arrow schema of every table written (its metadata is written to each file).
        prefix: file names are ``{prefix}-{i:05d}-of-{n:05d}.parquet`` once :meth:`close` knows ``n``.
        max_file_bytes: a file is closed once it holds this many uncompressed Arrow bytes.
        max_row_group_bytes: row groups hold about this many bytes: the row count per group is set from the
            bytes per row of the first non-empty table.

    Use :meth:`write` for each table, then :meth:`close` for the file paths (:attr:`files`); in a ``with``
    block, leaving it closes, or on an exception removes the partial files. An empty split still gives one
    (empty) file, as ``datasets`` expects a data file per split.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        schema: "pa.Schema",
        *,
        prefix: str = "train",
        max_file_bytes: int = MAX_FILE_BYTES,
        max_row_group_bytes: int = MAX_ROW_GROUP_BYTES,
    ) -> None:
        self.folder, self.schema, self.prefix = Path(folder), schema, prefix
        self.max_file_bytes, self.max_row_group_bytes = max_file_bytes, max_row_group_bytes
        self.rows = 0  #: rows written so far
        self.num_bytes = 0  #: uncompressed Arrow bytes written so far
        self._cdc = {"use_content_defined_chunking": CDC_OPTIONS} if has_cdc() else {}
        self._parts: list[Path] = []
        self._writer: "pq.ParquetWriter | None" = None
        self._file_bytes = 0
        self._group_rows: int | None = None
        self._pending: list["pa.Table"] = []
        self.files: list[Path] | None = None  #: the final paths, once closed

    def write(self, table: "pa.Table") -> None:
        """Add rows (a table with :attr:`schema`); full row groups are written at once, the rest is buffered."""
        import pyarrow as pa

        self.rows += table.num_rows
        self.num_bytes += table.nbytes
        if table.num_rows and self._group_rows is None:
            self._group_rows = max(1, table.num_rows * self.max_row_group_bytes // max(1, table.nbytes))
        buffered = pa.concat_tables([*self._pending, table])
        while self._group_rows and buffered.num_rows >= self._group_rows:
            self._write_group(buffered.slice(0, self._group_rows))
            buffered = buffered.slice(self._group_rows)
        self._pending = [buffered]

    def _write_group(self, table: "pa.Table") -> None:
        import pyarrow.parquet as pq

        if self._writer is None:
            self._parts.append(self.folder / f".{self.prefix}-{len(self._parts):05d}.tmp")
            self._writer = pq.ParquetWriter(
                self._parts[-1], self.schema, compression="zstd", write_page_index=True, **self._cdc
            )
            if self._cdc:
                self._writer.add_key_value_metadata({"content_defined_chunking": json.dumps(CDC_OPTIONS)})
        self._writer.write_table(table, row_group_size=max(1, table.num_rows))
        self._file_bytes += table.nbytes
        if self._file_bytes >= self.max_file_bytes:
            self._writer.close()
            self._writer, self._file_bytes = None, 0

    def close(self) -> list[Path]:
        """Write what is buffered, close the last file and give the files their final names (once).

        Returns:
            The paths of the files, in order (also in :attr:`files`).
        """
        import pyarrow as pa

        if self.files is not None:
            return self.files
        leftover = pa.concat_tables(self._pending) if self._pending else self.schema.empty_table()
        self._pending = []
        if leftover.num_rows or not self._parts:
            self._write_group(leftover)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        final = [
            self.folder / f"{self.prefix}-{i:05d}-of-{len(self._parts):05d}.parquet" for i in range(len(self._parts))
        ]
        for part, path in zip(self._parts, final, strict=True):
            part.rename(path)
        self.files = final
        return final

    def __enter__(self) -> "ParquetParts":
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is None:
            self.close()
            return
        if self._writer is not None:
            self._writer.close()
        for part in self._parts:
            part.unlink(missing_ok=True)
