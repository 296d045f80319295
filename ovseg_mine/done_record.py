"""The done record of a shard: the JSON object in ``RUN/done/shard-NNNNN.json`` (:mod:`ovseg_mine.shards`), as typed
values.

A shard's done record is written by ``mine``'s driver when it commits the shard, and read back by the resume check
(:func:`ovseg_mine.shards.read_done`), the manifest, ``mine --retry-failed``, the verified read of every reader
(:mod:`ovseg_mine.verify`) and ``inspect``. All of them go through :class:`DoneRecord`:

* :meth:`DoneRecord.to_json` gives the JSON object the driver writes (keys sorted on disk by
  :func:`ovseg_mine.shards.write_json_atomic`);
* :meth:`DoneRecord.from_json` reads one back; keys that a record lacks (a hand-made record, or one of an earlier
  version) take their defaults, keys it does not know are ignored, and a value of the wrong kind raises
  ``ValueError``.

The JSON object::

    file        "shards/shard-00042.parquet"
    rows        pairs in the file
    sha256      hex sha256 of the file's bytes
    shard       the shard index
    input       the identity of the shard's input (ovseg_mine.mine.sources.base.ShardTask.input)
    image_ids   ids of the shard's images, in shard order
    images      per image, in shard order: ImageStatus
    rejects     the images (or input files: image_id null) not mined, and why: Reject
    warnings    images mined with a correction (stage "warning"): Reject
    stage_s     seconds per stage (decode, nouns, proposals, crops, clip), summed over the shard's images (on a
                GPU, proposals/crops/clip are host time unless engine.profile_steps: engine.StepTimer)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


def _int(value: Any, what: str, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what}: an integer was expected, not {value!r}")
    return value


def _str(value: Any, what: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{what}: a string was expected, not {value!r}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{what}: a list was expected, not {type(value).__name__}")
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what}: a JSON object was expected, not {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Reject:
    """An image (or record) that was not mined, and why.

    ``stage`` is where it was found: ``source``, ``captions``, ``decode``, ``nouns``, ``proposals``,
    ``matching`` or ``error``; ``reason`` is a human-readable sentence. The same shape lists warnings (an
    image that was mined, with a correction: a caption skipped or cut, a size that differs from the source;
    stage ``warning``). ``image_id`` None: a reject about an input file, not an image.
    """

    image_id: int | None
    file_name: str | None
    stage: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        """``{"image_id", "file_name", "stage", "reason"}``, as done records and the manifest list it."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "Reject":
        """Raises: ValueError: not a JSON object of this shape."""
        data = _object(data, "a reject")
        return cls(
            image_id=_int(data.get("image_id"), "reject image_id", optional=True),
            file_name=_str(data.get("file_name"), "reject file_name", optional=True),
            stage=_str(data.get("stage"), "reject stage"),
            reason=_str(data.get("reason", ""), "reject reason"),
        )


@dataclass(frozen=True)
class ImageStatus:
    """One image of a shard as its done record lists it.

    Attributes:
        image_id: the image's id.
        status: ``ok``, or the stage that rejected it (:class:`Reject`).
        reason: why it was rejected ("" when ``ok``).
        width, height: the decoded size in pixels (the source's when it was not decoded; None: not recorded).
        num_nouns: nouns parsed from its captions.
        num_proposals: non-empty mask proposals it was matched against.
        num_pairs: pairs it gave (rows in the shard file).
        notes: what happened on the way (a caption skipped or cut, a size that differs from the source).
        error_type: the exception's class name when mining it failed (status ``error``); "" otherwise, and then
            absent from the JSON.
    """

    image_id: int
    status: str
    reason: str = ""
    width: int | None = None
    height: int | None = None
    num_nouns: int = 0
    num_proposals: int = 0
    num_pairs: int = 0
    notes: tuple[str, ...] = ()
    error_type: str = ""

    def to_json(self) -> dict[str, Any]:
        """The entry of the done record's ``images``."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "error_type"}
        data["notes"] = list(self.notes)
        if self.error_type:
            data["error_type"] = self.error_type
        return data

    @classmethod
    def from_json(cls, data: Any) -> "ImageStatus":
        """Raises: ValueError: not a JSON object of this shape (``image_id`` and ``status`` are required)."""
        data = _object(data, "an image of a done record")
        if "image_id" not in data or "status" not in data:
            raise ValueError("an image of a done record lacks its image_id or status")
        return cls(
            image_id=_int(data["image_id"], "image_id"),
            status=_str(data["status"], "status"),
            reason=_str(data.get("reason") or "", "reason"),
            width=_int(data.get("width"), "width", optional=True),
            height=_int(data.get("height"), "height", optional=True),
            num_nouns=_int(data.get("num_nouns") or 0, "num_nouns"),
            num_proposals=_int(data.get("num_proposals") or 0, "num_proposals"),
            num_pairs=_int(data.get("num_pairs") or 0, "num_pairs"),
            notes=tuple(_str(n, "note") for n in _list(data.get("notes") or [], "notes")),
            error_type=_str(data.get("error_type") or "", "error_type"),
        )


@dataclass(frozen=True)
class DoneRecord:
    """A shard's done record (see the module docstring for the JSON object).

    Attributes:
        file: the shard file, relative to the run folder (``shards/shard-00042.parquet``); None in a record not
            yet committed (:func:`ovseg_mine.shards.write_shard` sets it) or one that names none.
        rows: pairs in the file.
        sha256: hex sha256 of the file's bytes as committed; None as ``file``.
        shard: the shard index.
        input: JSON-able identity of the shard's input, compared on resume.
        image_ids: the shard's image ids, in shard order.
        images: per image, in shard order.
        rejects: images (or input files) not mined.
        warnings: images mined with a correction.
        stage_s: seconds per stage, summed over the shard's images (see the module docstring).
    """

    file: str | None = None
    rows: int = 0
    sha256: str | None = None
    shard: int | None = None
    input: dict[str, Any] | None = None
    image_ids: tuple[int, ...] = ()
    images: tuple[ImageStatus, ...] = ()
    rejects: tuple[Reject, ...] = ()
    warnings: tuple[Reject, ...] = ()
    stage_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``RUN/done/shard-NNNNN.json``."""
        return {
            "shard": self.shard,
            "input": self.input,
            "image_ids": list(self.image_ids),
            "images": [image.to_json() for image in self.images],
            "rejects": [r.to_json() for r in self.rejects],
            "warnings": [r.to_json() for r in self.warnings],
            "stage_s": dict(self.stage_s),
            "file": self.file,
            "rows": self.rows,
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, data: Any) -> "DoneRecord":
        """A done record from its JSON object; missing keys take their defaults, unknown keys are ignored.

        Raises:
            ValueError: not a JSON object, or a value of the wrong kind.
        """
        data = _object(data, "a done record")
        stage_s = _object(data.get("stage_s") or {}, "stage_s")
        for stage, seconds in stage_s.items():
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
                raise ValueError(f"stage_s {stage}: a number was expected, not {seconds!r}")
        shard_input = data.get("input")
        return cls(
            file=_str(data.get("file"), "file", optional=True),
            rows=_int(data.get("rows") or 0, "rows"),
            sha256=_str(data.get("sha256"), "sha256", optional=True),
            shard=_int(data.get("shard"), "shard", optional=True),
            input=None if shard_input is None else _object(shard_input, "input"),
            image_ids=tuple(_int(i, "image id") for i in _list(data.get("image_ids") or [], "image_ids")),
            images=tuple(ImageStatus.from_json(i) for i in _list(data.get("images") or [], "images")),
            rejects=tuple(Reject.from_json(r) for r in _list(data.get("rejects") or [], "rejects")),
            warnings=tuple(Reject.from_json(r) for r in _list(data.get("warnings") or [], "warnings")),
            stage_s=stage_s,
        )
