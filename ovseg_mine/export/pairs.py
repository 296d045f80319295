"""The pairs an export writes: a run's finished shards, checked, filtered, with their masked crops.

Shards are read with :mod:`ovseg_mine.shards` (``shard_files``, ``read_done``, ``read_table``), from a local
folder or an object store. A shard file whose sha256 differs from its done marker is damaged: the export stops
before writing anything, with one line naming it. A shard without a done marker (an unfinished run) is left out,
counted and listed. Pairs are filtered (:class:`PairFilter`) and their crops rendered
(:func:`ovseg_mine.export.crops.ovseg_crop`) from the run's images (:class:`~ovseg_mine.export.images.RunImages`);
a pair whose image is missing, unreadable or of another size than mined is skipped, counted and listed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from ovseg_mine.export.crops import ovseg_crop, sample_key
from ovseg_mine.export.images import ImageLookupError, RunImages
from ovseg_mine.shards import ShardError, read_done, read_manifest, read_table
from ovseg_mine.storage import Location, StorageError, resolve, sha256_file
from ovseg_mine.verify import shard_files

#: The columns an export reads from the shards.
COLUMNS = [
    "pair_id",
    "image_id",
    "file_name",
    "width",
    "height",
    "caption",
    "noun",
    "mask",
    "bbox",
    "area",
    "similarity",
    "probability",
    "margin",
    "predicted_iou",
    "stability_score",
]


class ExportError(ValueError):
    """An export that cannot be made (not a run, a damaged shard, an unwritable output...): a one-line reason."""


@dataclass(frozen=True)
class PairFilter:
    """Which pairs an export keeps.

    Attributes:
        min_similarity: keep pairs with cosine ``similarity`` >= this.
        min_margin: keep pairs with ``margin`` >= this (a pair without a margin, i.e. no runner-up mask, is left out).
        nouns: keep only these nouns (exact, after lower-casing and stripping); None keeps all.
        limit: at most this many pairs, the first in shard order after the other filters.
    """

    min_similarity: float | None = None
    min_margin: float | None = None
    nouns: frozenset[str] | None = None
    limit: int | None = None

    def keep(self, row: dict[str, Any]) -> bool:
        """True when the pair row passes the score and noun filters (not the limit)."""
        if self.min_similarity is not None and (row["similarity"] is None or row["similarity"] < self.min_similarity):
            return False
        if self.min_margin is not None and (row["margin"] is None or row["margin"] < self.min_margin):
            return False
        return self.nouns is None or row["noun"].strip().lower() in self.nouns

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["nouns"] = sorted(self.nouns) if self.nouns is not None else None
        return out


def read_nouns(path: str | os.PathLike[str]) -> frozenset[str]:
    """Nouns of a ``--nouns`` file: one per line, blank lines and lines starting with ``#`` ignored.

    Raises:
        ExportError: the file cannot be read or names no noun.
    """
    try:
        text = resolve(os.fspath(path)).read_text()
    except (StorageError, UnicodeDecodeError) as exc:
        raise ExportError(f"--nouns {path}: cannot read it ({exc})") from exc
    nouns = frozenset(line.strip().lower() for line in text.splitlines() if line.strip() and not line.startswith("#"))
    if not nouns:
        raise ExportError(f"--nouns {path} names no noun (one per line)")
    return nouns


@dataclass
class Sample:
    """One exported pair: ``key`` (file-safe, :func:`~ovseg_mine.export.crops.sample_key`), its shard row, its
    ordinal among the kept pairs, and its crop (uint8 ``[h, w, 3]``; None when the caller said it is written)."""

    key: str
    row: dict[str, Any]
    ordinal: int
    crop: np.ndarray | None

    def meta(self) -> dict[str, Any]:
        """The pair's identity and scores, JSON-able: what ``KEY.json`` of a webdataset sample holds."""
        keys = ("pair_id", "image_id", "file_name", "caption", "noun", "bbox", "area", "similarity", "probability")
        keys += ("margin", "predicted_iou", "stability_score", "width", "height")
        return {k: self.row[k] for k in keys}


@dataclass
class RunPairs:
    """A run checked for export (:func:`open_run`): its manifest, the finished shards ``(index, location)``, the
    shard files left out for want of a done marker, and skipped pairs (``{pair_id, image_id, file_name, reason}``)."""

    run: Location
    manifest: dict[str, Any]
    shards: list[tuple[int, Location]]
    unfinished: list[str] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def count(self, filt: PairFilter) -> int:
        """Pairs the filter keeps (limit applied), from the score and noun columns only."""
        n = 0
        for _index, path in self.shards:
            table = read_table(path, columns=["noun", "similarity", "margin"])
            n += sum(1 for row in table.to_pylist() if filt.keep(row))
        return n if filt.limit is None else min(n, filt.limit)

    def samples(
        self,
        filt: PairFilter,
        images: RunImages,
        *,
        written: Callable[[int, str], bool] = lambda ordinal, key: False,
    ) -> Iterator[Sample]:
        """The kept pairs in shard order, each with its crop.

        Args:
            filt: the filters.
            images: where the run's images are read.
            written: ``(ordinal, key) -> True`` for pairs whose output exists: they come with ``crop=None`` and
                their image is not decoded when all its pairs are written.

        Pairs that cannot be cropped are appended to :attr:`skipped` instead of yielded.
        """
        from ovseg_mine import rle

        ordinal = 0
        for index, path in self.shards:
            rows = [r for r in read_table(path, columns=COLUMNS).to_pylist() if filt.keep(r)]
            if filt.limit is not None:
                rows = rows[: max(0, filt.limit - ordinal)]
            if not rows:
                continue
            by_image: dict[int, list[tuple[int, dict[str, Any]]]] = {}
            for r in rows:
                by_image.setdefault(r["image_id"], []).append((ordinal, r))
                ordinal += 1
            ready: list[Sample] = []
            needed = {}
            for image_id, items in by_image.items():
                if all(written(o, sample_key(r["image_id"], r["pair_id"])) for o, r in items):
                    ready += [Sample(sample_key(r["image_id"], r["pair_id"]), r, o, None) for o, r in items]
                else:
                    needed[image_id] = items[0][1]["file_name"]
            for image_id, pixels, reason in images.shard_images(index, needed.items()):
                for o, r in by_image[image_id]:
                    key = sample_key(r["image_id"], r["pair_id"])
                    if pixels is not None and pixels.shape[:2] != (r["height"], r["width"]):
                        reason = f"image is {pixels.shape[1]}x{pixels.shape[0]}, mined at {r['width']}x{r['height']}"
                        pixels = None
                    if pixels is None:
                        skip = {"pair_id": r["pair_id"], "image_id": image_id, "file_name": r["file_name"]}
                        self.skipped.append({**skip, "reason": reason})
                        continue
                    crop = None if written(o, key) else ovseg_crop(pixels, rle.decode(r["mask"]), r["bbox"])
                    ready.append(Sample(key, r, o, crop))
            yield from sorted(ready, key=lambda s: s.ordinal)


def open_run(run: str | os.PathLike[str] | Location) -> RunPairs:
    """Check a run folder for export: manifest, shards, and each finished shard's sha256 against its done marker.

    Raises:
        ExportError: not a run folder, a damaged shard (named: its sha256 differs from its done marker, or its
            marker is not readable), or no finished shard.
    """
    import posixpath

    try:
        location = resolve(run)
        manifest = read_manifest(location)
        files = shard_files(location)
        records = read_done(location, verify=False)
    except (ShardError, StorageError) as exc:
        raise ExportError(str(exc)) from exc
    by_file = {posixpath.basename(r.file or ""): (i, r) for i, r in records.items()}
    shards, unfinished = [], []
    for path in files:
        if path.name not in by_file:
            unfinished.append(path.name)
            continue
        index, record = by_file[path.name]
        try:
            digest = sha256_file(path)
        except StorageError as exc:
            raise ExportError(f"cannot read shard {path}: {exc}") from exc
        if digest != record.sha256:
            raise ExportError(
                f"shard {path} is damaged: its sha256 {digest[:12]}... differs from its done marker's "
                f"{str(record.sha256)[:12]}...; rerun the mining command to redo it, then export"
            )
        shards.append((index, path))
    if not shards:
        raise ExportError(f"{location} has no finished shard (shards with a done marker) to export")
    return RunPairs(location, manifest, sorted(shards, key=lambda s: s[0]), unfinished)


def run_images(pairs: RunPairs, images: str | os.PathLike[str] | None) -> RunImages:
    """:class:`RunImages` of a checked run, or ExportError when its images cannot be found."""
    try:
        return RunImages(pairs.manifest, images)
    except ImageLookupError as exc:
        raise ExportError(str(exc)) from exc


def settings_file(out: str | os.PathLike[str]) -> str:
    """``OUT/export.json``: what an export folder holds (format, run, filters, counts, skipped pairs)."""
    return os.path.join(os.fspath(out), "export.json")


def check_settings(out: str | os.PathLike[str], settings: dict[str, Any]) -> None:
    """Refuse to mix exports: ``OUT/export.json`` of another format, run, template or filters.

    Raises:
        ExportError: the folder holds an export with other settings (one line naming the first difference).
    """
    path = settings_file(out)
    if not os.path.isfile(path):
        return
    try:
        old = json.loads(open(path, encoding="utf-8").read()).get("settings", {})
    except (OSError, ValueError):
        return
    for key, value in settings.items():
        if old.get(key) != value:
            raise ExportError(
                f"{out} holds an export with another {key} ({old.get(key)!r}, now {value!r}); choose another --out"
            )


def write_json(path: str, data: Any) -> None:
    """Write JSON whole (a temporary name, then a rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
    os.replace(tmp, path)


def prepare_out(out: str | os.PathLike[str]) -> str:
    """Create ``out`` (a local folder) and check it is writable; remove leftover ``*.tmp`` files of a stopped export.

    Raises:
        ExportError: ``out`` is a URI, cannot be created, or cannot be written.
    """
    out = os.fspath(out)
    if "://" in out:
        raise ExportError(f"--out {out}: exports are written to a local folder (the CSV holds absolute file paths)")
    out = os.path.abspath(os.path.expanduser(out))
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
        for root, _dirs, names in os.walk(out):
            for name in names:
                if name.endswith(".tmp"):
                    os.remove(os.path.join(root, name))
    except OSError as exc:
        raise ExportError(f"cannot write to --out {out}: {exc.strerror or exc}") from exc
    return out


@dataclass
class ExportResult:
    """What an export wrote: ``pairs`` samples (``written`` of them new in this call) in ``files`` (paths), the
    skipped pairs, the shard files left out as unfinished, and the open_clip_train ``command`` that trains on it."""

    out: str
    pairs: int
    written: int
    files: list[str]
    skipped: list[dict[str, Any]]
    unfinished: list[str]
    command: str = ""


def title(template: str, noun: str) -> str:
    """The caption a pair is trained with: ``template`` with ``{}`` replaced by the noun."""
    return template.replace("{}", noun)


def check_template(template: str) -> None:
    """Raises ExportError unless ``template`` holds ``{}`` exactly once (where the noun goes)."""
    if template.count("{}") != 1:
        raise ExportError(f"--template must hold {{}} exactly once (the noun), got {template!r}")
