"""Sources: read an image-caption dataset into one record per image.

COCO Captions layout: a JSON file ``{"images": [{"id", "file_name", "width", "height", ...}],
"annotations": [{"id", "image_id", "caption"}]}`` and an image root folder (e.g. ``train2017/``).
Every problem with one image is a :class:`Reject` (counted and listed in the run's manifest); only a file
that is not a captions JSON at all is an error, raised before any work starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from ovseg_mine.mine.captions import screen_caption


class SourceError(ValueError):
    """The captions file or image root cannot be used at all (missing, malformed JSON, wrong shape)."""


@dataclass(frozen=True)
class ImageRecord:
    """One image to mine.

    Attributes:
        image_id: the dataset's image id (COCO ``images[].id``).
        file_name: path relative to the image root, as written in the JSON.
        path: absolute path of the file, guaranteed to lie inside the image root.
        width, height: size in pixels as the JSON states it (the decoded image's size wins later).
        captions: the first ``captions_per_image`` captions that pass :func:`ovseg_mine.mine.captions.screen_caption`,
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
        """Plain dict for Ray Data (captions as a list; ``notes`` stay with the driver, which lists them)."""
        row = asdict(self)
        row["captions"] = list(self.captions)
        del row["notes"]
        return row


@dataclass(frozen=True)
class Reject:
    """An image (or record) that was not mined, and why.

    ``stage`` is where it was found: ``source``, ``captions``, ``decode``, ``nouns``, ``proposals``,
    ``matching`` or ``error``; ``reason`` is a human-readable sentence. The same shape lists warnings (an
    image that was mined, with a correction: a caption skipped or cut, a size that differs from the JSON).
    """

    image_id: int | None
    file_name: str | None
    stage: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Source:
    """The result of reading a source: records to mine (sorted by image_id) and source-level rejects."""

    records: list[ImageRecord]
    rejects: list[Reject]
    captions_path: str
    image_root: str
    num_images_in_file: int


def _load_json(captions_json: Path) -> dict[str, Any]:
    if not captions_json.is_file():
        raise SourceError(f"captions file not found: {captions_json}")
    try:
        with captions_json.open("rb") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"captions file {captions_json} is not valid JSON: {exc}") from exc
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise SourceError(
            f"captions file {captions_json} is not in COCO Captions format: expected an object with "
            "'images' and 'annotations' lists"
        )
    return data


def _safe_path(image_root: Path, file_name: str) -> Path | None:
    """Absolute path of ``file_name`` under ``image_root``, or None if it escapes the root."""
    if not file_name or os.path.isabs(file_name) or "\x00" in file_name:
        return None
    candidate = (image_root / file_name).resolve()
    try:
        candidate.relative_to(image_root)
    except ValueError:
        return None
    return candidate


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


def _screen(texts: list[str], wanted: int, max_chars: int, english_only: bool) -> tuple[tuple[str, ...], list[str]]:
    """The first ``wanted`` captions that pass screening, and notes on those skipped or cut on the way."""
    kept: list[str] = []
    notes: list[str] = []
    for index, text in enumerate(texts):
        if len(kept) == wanted:
            break
        screened = screen_caption(text, max_chars=max_chars, english_only=english_only)
        if screened.note:
            notes.append(f"caption {index}: {screened.note}")
        if screened.text is not None:
            kept.append(screened.text)
    return tuple(kept), notes


def read_coco_captions(
    captions_json: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    *,
    captions_per_image: int = 1,
    limit: int | None = None,
    image_ids: Iterable[int] | None = None,
    max_caption_chars: int = 1000,
    skip_non_english: bool = True,
) -> Source:
    """Read a COCO Captions JSON and its image root into image records.

    Args:
        captions_json: path of ``captions_*.json``.
        image_root: folder that ``file_name`` entries are relative to.
        captions_per_image: keep the first N usable captions of each image (ordered by annotation id).
        limit: after sorting by image_id (and selecting ``image_ids``), keep the first N images.
        image_ids: mine only these ids; ids that are not in the file are listed as rejects.
        max_caption_chars, skip_non_english: caption screening (:func:`ovseg_mine.mine.captions.screen_caption`);
            skipped and cut captions are noted on the record.

    Returns:
        A :class:`Source`; records are sorted by image_id. Rejected: malformed image entries, duplicate
        image ids (the first entry is kept), file names that escape the image root (``../``, absolute
        paths), images without a caption (stage ``source``) or without a usable one (stage ``captions``).

    Raises:
        SourceError: missing or malformed JSON, wrong top-level shape, or a missing image root.
    """
    captions_path = Path(captions_json)
    root = Path(image_root)
    if not root.is_dir():
        raise SourceError(f"image root is not a folder: {root}")
    root = root.resolve()
    data = _load_json(captions_path)
    captions_by_image, malformed_captions = _collect_captions(data["annotations"])

    rejects: list[Reject] = []
    if malformed_captions:
        rejects.append(
            Reject(None, None, "source", f"{malformed_captions} caption annotations lack image_id or caption")
        )
    wanted = set(image_ids) if image_ids is not None else None
    seen: set[int] = set()
    records: list[ImageRecord] = []
    for entry in data["images"]:
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
        path = _safe_path(root, file_name)
        if path is None:
            rejects.append(Reject(image_id, file_name, "source", "file_name escapes the image root"))
            continue
        ordered = [text for _, text in sorted(captions_by_image.get(image_id, []))]
        if not ordered:
            rejects.append(Reject(image_id, file_name, "source", "no caption"))
            continue
        captions, notes = _screen(ordered, captions_per_image, max_caption_chars, skip_non_english)
        if not captions:
            rejects.append(Reject(image_id, file_name, "captions", "no usable caption: " + "; ".join(notes)))
            continue
        width = entry.get("width") if isinstance(entry.get("width"), int) else 0
        height = entry.get("height") if isinstance(entry.get("height"), int) else 0
        records.append(ImageRecord(image_id, file_name, str(path), width, height, captions, tuple(notes)))

    if wanted is not None:
        for missing in sorted(wanted - seen):
            rejects.append(Reject(missing, None, "source", "image id not in the captions file"))
    records.sort(key=lambda record: record.image_id)
    if limit is not None:
        records = records[:limit]
    return Source(records, rejects, str(captions_path.resolve()), str(root), len(data["images"]))
