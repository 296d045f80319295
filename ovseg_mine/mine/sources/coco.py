"""COCO Captions: a captions JSON and an image root (``--captions F --images DIR``).

Layout: a JSON file ``{"images": [{"id", "file_name", "width", "height", ...}], "annotations": [{"id",
"image_id", "caption"}]}`` and an image root folder (e.g. ``train2017/``). Every problem with one image is a
:class:`~ovseg_mine.mine.sources.base.Reject` (counted and listed in the run's manifest); only a file that is not
a captions JSON at all is an error, raised before any work starts.

The JSON is one document, so it is read whole, once, by the driver; the shard plan is then chunks of
``shards.images_per_shard`` records of the id-sorted selection, each chunk carried by its task into Ray (the
driver keeps no record once the tasks are handed over).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from ovseg_mine.mine.sources.base import Reject, ShardTask, Source, SourceError, SourcePlan
from ovseg_mine.mine.sources.records import screen_captions
from ovseg_mine.storage import Location, StorageError, resolve, sha256_file


@dataclass(frozen=True)
class ImageRecord:
    """One image to mine.

    Attributes:
        image_id: the dataset's image id (COCO ``images[].id``).
        file_name: path relative to the image root, as written in the JSON.
        path: where the image is read: an absolute local path (guaranteed to lie inside the image root) or a URI.
        width, height: size in pixels as the JSON states it (the decoded image's size wins later; 0: not stated).
        captions: the first ``captions_per_image`` captions that pass
            :func:`ovseg_mine.mine.sources.captions.screen_caption`,
            in annotation-id order (stripped; an over-long one cut).
        notes: what happened to this image's captions on the way (skipped as not English, cut...), one
            sentence each; they are listed as the run's warnings.
    """

    image_id: int
    file_name: str
    path: str
    width: int
    height: int
    captions: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def to_row(self) -> dict[str, Any]:
        """The record row (:func:`ovseg_mine.mine.sources.records.record_schema`, without the shard columns)."""
        row = asdict(self)
        row.update(captions=list(self.captions), notes=list(self.notes), image_bytes=None, status="ok", reason="")
        return row


@dataclass
class CocoCaptions:
    """A COCO Captions file read whole: records to mine (sorted by image_id) and source-level rejects."""

    records: list[ImageRecord]
    rejects: list[Reject]
    captions_path: str
    image_root: str
    num_images_in_file: int


def _load_json(captions: Location) -> dict[str, Any]:
    try:
        if not captions.is_file():
            raise SourceError(f"captions file not found: {captions}")
        data = json.loads(captions.read_bytes())
    except StorageError as exc:
        raise SourceError(f"captions file {captions} cannot be read: {exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"captions file {captions} is not valid JSON: {exc}") from exc
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise SourceError(
            f"captions file {captions} is not in COCO Captions format: expected an object with "
            "'images' and 'annotations' lists"
        )
    return data


class PathProblem(ValueError):
    """A ``file_name`` whose path cannot be resolved on the local disk (a symlink loop, a folder on the way that
    cannot be read); ``str(error)`` is the reason a source lists with the reject."""


def safe_child(root: Location, file_name: str) -> str | None:
    """Where ``file_name`` (relative to the folder ``root``) is, as a local path or URI; None when it escapes
    the root (``../``, an absolute path, a NUL byte, or on a local disk a symlink pointing outside).

    Raises:
        PathProblem: on a local disk, the path cannot be resolved (a symlink loop: Python 3.11's
            ``Path.resolve`` raises ``RuntimeError``, 3.13's ``OSError`` ELOOP; a folder that cannot be read).
    """
    if not file_name or os.path.isabs(file_name) or file_name.startswith("/") or "\x00" in file_name:
        return None
    if root.is_local:
        base = Path(root.path).resolve()
        try:
            candidate = (base / file_name).resolve()
        except RuntimeError as exc:  # "Symlink loop from '...'"
            raise PathProblem(f"symlink loop: {file_name} cannot be resolved") from exc
        except OSError as exc:
            reason = "symlink loop" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
            raise PathProblem(f"{reason}: {file_name} cannot be resolved") from exc
        try:
            candidate.relative_to(base)
        except ValueError:
            return None
        return str(candidate)
    joined = posixpath.normpath(posixpath.join(root.path, file_name))
    if not joined.startswith(root.path.rstrip("/") + "/"):
        return None
    return f"{root.scheme}://{joined}"


def _collect_captions(annotations: list[Any]) -> tuple[dict[int, list[tuple[int, str]]], int]:
    by_image: dict[int, list[tuple[int, str]]] = {}
    malformed = 0
    for position, ann in enumerate(annotations):
        if (
            not isinstance(ann, dict)
            or not isinstance(ann.get("image_id"), int)
            or not isinstance(ann.get("caption"), str)
        ):
            malformed += 1
            continue
        ann_id = ann.get("id") if isinstance(ann.get("id"), int) else position
        by_image.setdefault(ann["image_id"], []).append((ann_id, ann["caption"]))
    return by_image, malformed


def read_coco_captions(
    captions_json: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    *,
    captions_per_image: int = 1,
    limit: int | None = None,
    image_ids: Iterable[int] | None = None,
    max_caption_chars: int = 1000,
    skip_non_english: bool = True,
) -> CocoCaptions:
    """Read a COCO Captions JSON and its image root into image records.

    Args:
        captions_json: path or URI of ``captions_*.json``.
        image_root: folder (path or URI) that ``file_name`` entries are relative to.
        captions_per_image: keep the first N usable captions of each image (ordered by annotation id).
        limit: after sorting by image_id (and selecting ``image_ids``), keep the first N images.
        image_ids: mine only these ids; ids that are not in the file are listed as rejects.
        max_caption_chars, skip_non_english: caption screening
            (:func:`ovseg_mine.mine.sources.captions.screen_caption`);
            skipped and cut captions are noted on the record.

    Returns:
        A :class:`CocoCaptions`; records are sorted by image_id. Rejected: malformed image entries, duplicate
        image ids (the first entry is kept), file names that escape the image root (``../``, absolute
        paths) or cannot be resolved (a symlink loop), images without a caption (stage ``source``) or without a
        usable one (stage ``captions``), and the captions of image ids that ``images`` does not list (one reject
        per such id).

    Raises:
        SourceError: missing or malformed JSON, wrong top-level shape, or a missing image root.
    """
    captions = resolve(captions_json)
    root = _image_root(image_root)
    data = _load_json(captions)
    captions_by_image, malformed_captions = _collect_captions(data["annotations"])

    rejects: list[Reject] = []
    if malformed_captions:
        rejects.append(
            Reject(None, None, "source", f"{malformed_captions} caption annotations lack image_id or caption")
        )
    wanted = set(image_ids) if image_ids is not None else None
    if wanted is None:  # with a selection, a selected id the images do not list is a reject instead (below)
        rejects += _orphan_rejects(data["images"], captions_by_image)

    def screen(texts: list[str]) -> tuple[list[str], list[str]]:
        return screen_captions(texts, captions_per_image, max_chars=max_caption_chars, english_only=skip_non_english)

    records, image_rejects, seen = _image_records(data["images"], root, captions_by_image, wanted, screen)
    rejects += image_rejects
    if wanted is not None:
        for missing in sorted(wanted - seen):
            rejects.append(Reject(missing, None, "source", "image id not in the captions file"))
    records.sort(key=lambda record: record.image_id)
    if limit is not None:
        records = records[:limit]
    return CocoCaptions(records, rejects, captions.uri, root.uri, len(data["images"]))


def _image_root(image_root: str | os.PathLike[str]) -> Location:
    """The image root, checked to be a folder (SourceError if not, or unreadable); on a local disk its real path."""
    root = resolve(image_root)
    try:
        if not root.is_dir():
            raise SourceError(f"image root is not a folder: {root}")
    except StorageError as exc:
        raise SourceError(f"image root {root} cannot be read: {exc}") from exc
    if root.is_local:
        root = resolve(Path(root.path).resolve())
    return root


def _orphan_rejects(images: list[Any], captions_by_image: dict[int, list[tuple[int, str]]]) -> list[Reject]:
    """One reject per image id that has captions but that the file's ``images`` do not list, by id."""
    listed = {e["id"] for e in images if isinstance(e, dict) and isinstance(e.get("id"), int)}
    rejects = []
    for orphan in sorted(captions_by_image.keys() - listed):
        count = len(captions_by_image[orphan])
        reason = f"{count} caption(s) for image id {orphan}, which the captions file's images do not list"
        rejects.append(Reject(orphan, None, "source", reason))
    return rejects


def _image_records(
    images: list[Any],
    root: Location,
    captions_by_image: dict[int, list[tuple[int, str]]],
    wanted: set[int] | None,
    screen: Callable[[list[str]], tuple[list[str], list[str]]],
) -> tuple[list[ImageRecord], list[Reject], set[int]]:
    """The records of the image entries (those in ``wanted`` if given), in file order; the rejects; the ids seen."""
    seen: set[int] = set()
    records: list[ImageRecord] = []
    rejects: list[Reject] = []
    for entry in images:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("id"), int)
            or not isinstance(entry.get("file_name"), str)
        ):
            rejects.append(Reject(None, None, "source", f"malformed image entry: {str(entry)[:120]}"))
            continue
        image_id, file_name = entry["id"], entry["file_name"]
        if wanted is not None and image_id not in wanted:
            continue
        if image_id in seen:
            rejects.append(Reject(image_id, file_name, "source", "duplicate image id (first entry kept)"))
            continue
        seen.add(image_id)
        record = _image_record(entry, root, captions_by_image.get(image_id, []), screen)
        (records if isinstance(record, ImageRecord) else rejects).append(record)
    return records, rejects, seen


def _image_record(
    entry: dict[str, Any],
    root: Location,
    captions: list[tuple[int, str]],
    screen: Callable[[list[str]], tuple[list[str], list[str]]],
) -> ImageRecord | Reject:
    """The record of one well-formed image entry with its ``(annotation id, caption)`` list, or why it is rejected."""
    image_id, file_name = entry["id"], entry["file_name"]
    try:
        path = safe_child(root, file_name)
    except PathProblem as exc:
        return Reject(image_id, file_name, "source", str(exc))
    if path is None:
        return Reject(image_id, file_name, "source", "file_name escapes the image root")
    ordered = [text for _, text in sorted(captions)]
    if not ordered:
        return Reject(image_id, file_name, "source", "no caption")
    kept, notes = screen(ordered)
    if not kept:
        return Reject(image_id, file_name, "captions", "no usable caption: " + "; ".join(notes))
    width = entry.get("width") if isinstance(entry.get("width"), int) else 0
    height = entry.get("height") if isinstance(entry.get("height"), int) else 0
    return ImageRecord(image_id, file_name, path, width, height, tuple(kept), tuple(notes))


class CocoSource(Source):
    """``--captions F --images DIR`` (or ``--source coco:F`` with ``--images DIR``): COCO Captions.

    Args:
        location: the captions JSON.
        image_root: the folder its ``file_name`` entries are relative to.
    """

    kind = "coco"

    def __init__(self, location: str, cfg: Any, screening: Any, *, image_root: str) -> None:
        super().__init__(location, cfg, screening)
        self.image_root = str(image_root)

    def plan(self, images_per_shard: int) -> SourcePlan:
        coco = read_coco_captions(
            self.location,
            self.image_root,
            captions_per_image=self.screening.captions_per_image,
            limit=self.cfg.limit,
            image_ids=self.cfg.image_ids,
            max_caption_chars=self.screening.max_caption_chars,
            skip_non_english=self.screening.skip_non_english,
        )
        tasks = []
        for start in range(0, len(coco.records), images_per_shard):
            rows = [r.to_row() for r in coco.records[start : start + images_per_shard]]
            # What decides the pairs, not where the files are: a moved image folder keeps its finished shards.
            content = [{k: v for k, v in row.items() if k != "path"} for row in rows]
            digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()
            identity = {"images": [rows[0]["image_id"], rows[-1]["image_id"], len(rows)], "sha256": digest}
            tasks.append(ShardTask(len(tasks), identity, len(rows), {"rows": rows}))
        info = {
            "kind": self.kind,
            "location": coco.captions_path,
            "captions": coco.captions_path,
            "captions_sha256": sha256_file(coco.captions_path),
            "image_root": coco.image_root,
            "images_in_file": coco.num_images_in_file,
            "images_selected": len(coco.records),
        }
        return SourcePlan(tasks, info, coco.rejects, image_root=coco.image_root)

    def samples(self, task: ShardTask) -> list[Any]:
        return task.payload["rows"]

    def rows(self, task: ShardTask, samples: list[Any]) -> Iterator[dict[str, Any]]:
        yield from samples
