"""``hf:NAME_OR_PATH``: a Hugging Face dataset, read file by file, never loaded whole.

LOCATION is one of:

* a folder written by ``Dataset.save_to_disk`` (``state.json`` and ``data-*.arrow``), or by
  ``DatasetDict.save_to_disk`` (``dataset_dict.json``, one such folder per split: ``--split``);
* a Parquet or Arrow file, or a folder of them laid out as on the Hub (``data/train-00000-of-00004.parquet``;
  splits resolved by ``datasets``' own data-file patterns: ``--split``);
* a Hub dataset name (``user/name``, ``user/name@REVISION``; ``--hf-config``, ``--split``) whose data files are
  Parquet (most are; any public dataset's auto-converted copy is ``user/name@refs/convert/parquet``), read
  through the ``hf://`` file system at the resolved commit, which the manifest records.

One output shard per data file. Columns: ``--image-column`` (an ``Image`` feature ``{bytes, path}``, raw bytes
or a path; default: the column ``datasets`` declares as ``Image``, else ``image``...), ``--caption-column`` (a
string or a list of strings per row; default ``caption``, ``captions``, ``text``...), ``--id-column`` (an
integer column; default: the 63-bit hash of ``DATA_FILE/ROW``). ``file_name`` is ``DATA_FILE/ROW``, e.g.
``data-00000-of-00002.arrow/17``. A data file that cannot be read (cut short, corrupt) is listed as one reject
of the file (:mod:`~ovseg_mine.mine.sources.tables`); the other files are mined.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ovseg_mine.mine.sources.base import SourceError, SourcePlan, limit_tasks
from ovseg_mine.mine.sources.tables import TableFile, TableSource, find_columns
from ovseg_mine.storage import Location, StorageError, resolve

_TABLE_SUFFIXES = (".parquet", ".arrow")
_REVISION = re.compile(r"@([^/]+)/")


class HfSource(TableSource):
    """A Hugging Face dataset (see the module docstring)."""

    kind = "hf"

    def plan(self, images_per_shard: int) -> SourcePlan:
        files, info = self._data_files()
        tasks = []
        columns = None
        unreadable = 0
        for index, (location, name) in enumerate(files):
            try:
                table = TableFile(location)
            except SourceError as exc:  # e.g. a Parquet file cut short: listed, the others are mined
                tasks.append(self.unreadable_task(index, location, name, str(exc)))
                unreadable += 1
                continue
            columns = find_columns(
                table.schema,
                f"hf:{self.location} ({name})",
                image=self.cfg.image_column,
                caption=self.cfg.caption_column,
                id_column=self.cfg.id_column,
            )
            tasks.append(self.file_task(index, location, name, columns, table.num_rows))
        tasks = limit_tasks(tasks, self.cfg.limit, self.count)
        info.update(kind=self.kind, columns=columns.to_dict() if columns else None, files=len(files))
        if unreadable:
            info["unreadable_files"] = unreadable
        return SourcePlan(tasks, info)

    def _data_files(self) -> tuple[list[tuple[Location, str]], dict[str, Any]]:
        """The data files (location, name relative to the dataset) and the manifest's description."""
        try:
            root = resolve(self.location)
            exists = root.exists()
        except StorageError as exc:
            raise SourceError(f"hf:{self.location} cannot be read: {exc}") from exc
        if exists and root.is_file():
            if not root.path.endswith(_TABLE_SUFFIXES):
                raise SourceError(f"hf:{self.location} is a file, but not a .parquet or .arrow file")
            return [(root, root.name)], {"location": root.uri}
        if exists:
            return self._local_dataset(root)
        if "://" in self.location or self.location.startswith(("/", ".")):
            raise SourceError(f"hf:{self.location} not found")
        return self._hub_dataset()

    def _local_dataset(self, root: Location) -> tuple[list[tuple[Location, str]], dict[str, Any]]:
        if root.join("dataset_dict.json").is_file():
            splits = json.loads(root.join("dataset_dict.json").read_text()).get("splits", [])
            split = self._split(splits, f"hf:{self.location}")
            files, info = self._saved(root.join(split))
            return files, {**info, "location": root.uri, "split": split}
        if root.join("state.json").is_file():
            return self._saved(root)
        import datasets

        try:
            builder = datasets.load_dataset_builder(root.path if root.is_local else root.uri)
        except Exception as exc:  # datasets raises many types (DataFilesNotFoundError, ValueError...)
            raise SourceError(f"hf:{self.location}: no dataset files found ({type(exc).__name__}: {exc})") from exc
        data_files = builder.config.data_files or {}
        split = self._split(list(data_files), f"hf:{self.location}")
        files = []
        for uri in data_files[split]:
            location = resolve(uri)
            if not location.path.endswith(_TABLE_SUFFIXES):
                raise SourceError(
                    f"hf:{self.location}: {location.name} is not Parquet or Arrow; ovseg-mine reads those"
                )
            files.append((location, location.path[len(root.path) + 1 :]))
        return files, {"location": root.uri, "split": split}

    def _saved(self, folder: Location) -> tuple[list[tuple[Location, str]], dict[str, Any]]:
        """A ``Dataset.save_to_disk`` folder: its Arrow files, in ``state.json`` order, and its fingerprint."""
        try:
            state = json.loads(folder.join("state.json").read_text())
            names = [entry["filename"] for entry in state["_data_files"]]
        except (StorageError, ValueError, KeyError, TypeError) as exc:
            raise SourceError(f"{folder.join('state.json')} is not a datasets save_to_disk state: {exc}") from exc
        files = [(folder.join(name), name) for name in names]
        return files, {"location": folder.uri, "fingerprint": state.get("_fingerprint")}

    def _hub_dataset(self) -> tuple[list[tuple[Location, str]], dict[str, Any]]:
        import datasets

        name, _, revision = self.location.partition("@")
        try:
            builder = datasets.load_dataset_builder(name, self.cfg.hf_config, revision=revision or None)
        except Exception as exc:  # ConnectionError, DatasetNotFoundError, ValueError (unknown config)...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SourceError(
                f"hf:{self.location}: cannot open this Hub dataset ({type(exc).__name__}: {first})"
            ) from exc
        data_files = builder.config.data_files or {}
        split = self._split(list(data_files), f"hf:{self.location}")
        files = []
        commit = None
        for uri in data_files[split]:
            if not uri.endswith(_TABLE_SUFFIXES):
                raise SourceError(
                    f"hf:{self.location}: its data files are not Parquet ({uri.rsplit('/', 1)[-1]}); use the Hub's "
                    f"Parquet conversion: --source hf:{name}@refs/convert/parquet"
                )
            found = _REVISION.search(uri)
            commit = commit or (found.group(1) if found else None)
            files.append((resolve(uri), uri.split("@", 1)[-1].split("/", 1)[-1]))
        info = {"location": name, "hub": True, "config": builder.config.name, "split": split, "revision": commit}
        return files, info

    def _split(self, splits: list[str], where: str) -> str:
        """``--split``, else ``train``, else the only split."""
        if self.cfg.split is not None:
            if self.cfg.split not in splits:
                raise SourceError(f"{where} has no split {self.cfg.split!r}; its splits: {', '.join(splits) or 'none'}")
            return self.cfg.split
        if "train" in splits:
            return "train"
        if len(splits) == 1:
            return splits[0]
        raise SourceError(f"{where} has splits {', '.join(splits) or 'none'}: choose one with --split")
