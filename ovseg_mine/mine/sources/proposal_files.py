"""Where given masks come from (``--proposals KIND:LOCATION``), and the step that attaches them to records.

* ``coco:INSTANCES_OR_PANOPTIC_JSON``: COCO instance annotations (polygons or RLE; ``iscrowd`` regions left out) or
  panoptic annotations (segments in the PNG folder beside the JSON, named like it without ``.json``; ``iscrowd``
  segments left out). Records are matched by **image id**: use the COCO source, or ``--id-column`` holding COCO
  ids. The JSON is read once, in a child process (so the driver's memory stays flat), into an index
  ``RUN/given_proposals/coco-SHA12.parquet`` sorted by image id, which the read tasks query by the ids of their
  batch. No scores: ``predicted_iou`` and ``stability_score`` are null.
* ``sa1b:DIR``: SA-1B's per-image JSON (``{"image": {...}, "annotations": [{"segmentation": RLE, "bbox",
  "predicted_iou", "stability_score", ...}]}``). Records are matched by **file name**: record ``.../sa_1.jpg``
  (or key ``sa_1``) reads ``DIR/sa_1.json``.

A record whose image has no given mask becomes a reject (stage ``proposals``) in the read step. The masks are
turned into proposals by :func:`ovseg_mine.mine.algorithms.given_proposals.given_mask_set` in the mask/match stage.
"""

from __future__ import annotations

import json
import posixpath
from typing import TYPE_CHECKING, Any, ClassVar

from ovseg_mine.mine.sources.base import SourceError
from ovseg_mine.storage import Location, StorageError, resolve, sha256_file

if TYPE_CHECKING:
    import pyarrow as pa

INDEX_DIR = "given_proposals"


class ProposalSource:
    """Base of the given-mask kinds: settings only (pickled to Ray's read tasks).

    Args:
        location: what follows ``KIND:`` in ``--proposals``.
    """

    kind: ClassVar[str] = ""

    def __init__(self, location: str) -> None:
        self.location = resolve(location).uri

    def prepare(self, run_dir: str) -> dict[str, Any]:
        """Check the location (and build what the read step queries) before any work; returns the manifest's
        ``proposals`` section.

        Raises:
            SourceError: missing or malformed (one line).
        """
        raise NotImplementedError

    def check(self, image_ids: list[int], file_names: list[str]) -> None:
        """Raise SourceError when none of these records (the first batch of the source) has given masks."""
        raise NotImplementedError

    def lookup(self, image_ids: list[int], file_names: list[str]) -> list[list[dict[str, Any]] | str]:
        """Per record: its given masks (entries of :func:`~ovseg_mine.mine.sources.records.proposal_type`), or
        the reason it has none."""
        raise NotImplementedError

    def attach(self, table: "pa.Table") -> "pa.Table":
        """Set the ``proposals`` column of a record batch; rows without given masks become rejects (stage
        ``proposals``); rows already rejected are left as they are."""
        import pyarrow as pa

        from ovseg_mine.mine.sources.records import proposal_type

        ok = [status == "ok" for status in table.column("status").to_pylist()]
        ids = [i for i, good in zip(table.column("image_id").to_pylist(), ok, strict=True) if good]
        names = [n for n, good in zip(table.column("file_name").to_pylist(), ok, strict=True) if good]
        found = iter(self.lookup(ids, names) if ids else [])
        proposals, statuses, reasons = [], table.column("status").to_pylist(), table.column("reason").to_pylist()
        for row, good in enumerate(ok):
            entry = next(found) if good else None
            if isinstance(entry, str):
                statuses[row], reasons[row], entry = "proposals", entry, None
            proposals.append(entry)
        for name, values, kind in (
            ("proposals", proposals, pa.list_(proposal_type())),
            ("status", statuses, pa.string()),
            ("reason", reasons, pa.string()),
        ):
            table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, kind))
        return table


# ------------------------------------------------------------------------------------------------------- COCO


def _coco_index(json_uri: str, index_uri: str) -> dict[str, Any]:
    """Read a COCO instances or panoptic JSON and write its per-image index (runs in a child process)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = resolve(json_uri)
    try:
        data = json.loads(source.read_bytes())
        images = {int(im["id"]): im for im in data["images"]}
        annotations = data["annotations"]
    except (StorageError, ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"--proposals coco:{source}: not readable JSON: {exc}") from exc
    except (KeyError, TypeError) as exc:
        raise SourceError(f"--proposals coco:{source}: not COCO annotations (needs images and annotations)") from exc
    panoptic = bool(annotations) and isinstance(annotations[0], dict) and "segments_info" in annotations[0]
    per_image: dict[int, list[Any]] = {}
    for ann in annotations:
        try:
            per_image.setdefault(int(ann["image_id"]), []).append(ann)
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"--proposals coco:{source}: an annotation without image_id: {str(ann)[:80]}") from exc
    rows = []
    for image_id in sorted(images):
        image = images[image_id]
        anns = per_image.get(image_id, [])
        if panoptic:
            kept = [{"png": a["file_name"], "segments": a["segments_info"]} for a in anns]
        else:
            kept = [
                {"segmentation": a["segmentation"], "bbox": a.get("bbox"), "iscrowd": a.get("iscrowd", 0)}
                for a in anns
                if a.get("segmentation")
            ]
        rows.append(
            {
                "image_id": image_id,
                "file_name": str(image.get("file_name", "")),
                "width": int(image.get("width") or 0),
                "height": int(image.get("height") or 0),
                "annotations": json.dumps(kept),
            }
        )
    schema = pa.schema(
        [
            ("image_id", pa.int64()),
            ("file_name", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("annotations", pa.string()),
        ]
    )
    index = resolve(index_uri)
    tmp = index.parent.join(index.name + ".tmp")
    index.fs.create_dir(index.parent.path, recursive=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp.path, filesystem=tmp.fs, row_group_size=1000)
    index.fs.move(tmp.path, index.path)
    return {"format": "panoptic" if panoptic else "instances", "images": len(rows), "annotations": len(annotations)}


class CocoProposals(ProposalSource):
    """COCO instances or panoptic annotations (see the module docstring)."""

    kind = "coco"

    def prepare(self, run_dir: str) -> dict[str, Any]:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        source = resolve(self.location)
        try:
            if not source.is_file():
                raise SourceError(f"--proposals coco:{source}: file not found")
            digest = sha256_file(source)
        except StorageError as exc:
            raise SourceError(f"--proposals coco:{source}: cannot read it: {exc}") from exc
        index = resolve(run_dir).join(INDEX_DIR, f"coco-{digest[:12]}.parquet")
        stats_file = index.parent.join(index.name + ".json")
        if index.is_file() and stats_file.is_file():
            stats = json.loads(stats_file.read_text())
        else:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                stats = pool.submit(_coco_index, source.uri, index.uri).result()
            with stats_file.fs.open_output_stream(stats_file.path) as handle:
                handle.write(json.dumps(stats).encode("utf-8"))
        self.index = index.uri
        self.png_root = source.uri[: -len(".json")] if source.uri.endswith(".json") else source.uri
        self.format = stats["format"]
        return {"kind": self.kind, "location": source.uri, "sha256": digest, **stats}

    def _entries(self, image_ids: list[int]) -> dict[int, dict[str, Any]]:
        import pyarrow.parquet as pq

        index = resolve(self.index)
        table = pq.read_table(index.path, filesystem=index.fs, filters=[("image_id", "in", sorted(set(image_ids)))])
        return {row["image_id"]: row for row in table.to_pylist()}

    def check(self, image_ids: list[int], file_names: list[str]) -> None:
        if image_ids and not self._entries(image_ids):
            raise SourceError(
                f"--proposals coco:{self.location} names none of the source's first images (ids "
                f"{', '.join(str(i) for i in image_ids[:3])}...): COCO masks are matched by image id; use the COCO "
                "source, or --id-column with COCO image ids"
            )

    def lookup(self, image_ids: list[int], file_names: list[str]) -> list[list[dict[str, Any]] | str]:
        from ovseg_mine import rle

        entries = self._entries(image_ids)
        name = posixpath.basename(self.location)
        out: list[list[dict[str, Any]] | str] = []
        for image_id in image_ids:
            entry = entries.get(image_id)
            if entry is None:
                out.append(f"image id {image_id} is not in {name}")
                continue
            anns = json.loads(entry["annotations"])
            try:
                if self.format == "panoptic":
                    masks = [m for a in anns for m in self._panoptic(a)]
                else:
                    height, width = entry["height"], entry["width"]
                    masks = [
                        _entry(rle.from_segmentation(a["segmentation"], height, width), a.get("bbox"))
                        for a in anns
                        if not a.get("iscrowd")
                    ]
            except (rle.RLEError, StorageError, OSError) as exc:  # a malformed segmentation, a missing panoptic PNG
                out.append(f"the masks of image {image_id} in {name} cannot be read: {exc}")
                continue
            out.append(masks if masks else f"no mask for this image in {name}")
        return out

    def _panoptic(self, ann: dict[str, Any]) -> list[dict[str, Any]]:
        import io

        import numpy as np
        from PIL import Image

        from ovseg_mine import rle

        png = resolve(self.png_root).join(ann["png"])
        with Image.open(io.BytesIO(png.read_bytes())) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint32)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        return [_entry(rle.encode(ids == s["id"]), s.get("bbox")) for s in ann["segments"] if not s.get("iscrowd")]


def _entry(segmentation: dict[str, Any], bbox: Any, iou: Any = None, stability: Any = None) -> dict[str, Any]:
    return {
        "segmentation": segmentation,
        "bbox": [float(v) for v in bbox] if isinstance(bbox, list) else None,
        "predicted_iou": None if iou is None else float(iou),
        "stability_score": None if stability is None else float(stability),
    }


# ------------------------------------------------------------------------------------------------------- SA-1B


def _stem(file_name: str) -> str:
    return posixpath.splitext(posixpath.basename(file_name))[0]


class Sa1bProposals(ProposalSource):
    """SA-1B per-image JSON files (see the module docstring)."""

    kind = "sa1b"

    def prepare(self, run_dir: str) -> dict[str, Any]:
        folder = resolve(self.location)
        try:
            if not folder.is_dir():
                raise SourceError(f"--proposals sa1b:{folder}: not a folder")
        except StorageError as exc:
            raise SourceError(f"--proposals sa1b:{folder}: cannot read it: {exc}") from exc
        return {"kind": self.kind, "location": folder.uri}

    def _json(self, file_name: str) -> Location:
        return resolve(self.location).join(_stem(file_name) + ".json")

    def check(self, image_ids: list[int], file_names: list[str]) -> None:
        if file_names and not any(self._json(name).is_file() for name in file_names):
            raise SourceError(
                f"--proposals sa1b:{self.location} has no JSON for any of the source's first images (e.g. "
                f"{_stem(file_names[0])}.json for {file_names[0]}): SA-1B masks are matched by file name"
            )

    def lookup(self, image_ids: list[int], file_names: list[str]) -> list[list[dict[str, Any]] | str]:
        from ovseg_mine import rle

        out: list[list[dict[str, Any]] | str] = []
        for file_name in file_names:
            path = self._json(file_name)
            try:
                data = json.loads(path.read_bytes())
                image = data.get("image") or {}
                height, width = int(image.get("height") or 0), int(image.get("width") or 0)
                masks = [
                    _entry(
                        rle.from_segmentation(a["segmentation"], height, width),
                        a.get("bbox"),
                        a.get("predicted_iou"),
                        a.get("stability_score"),
                    )
                    for a in data["annotations"]
                ]
            except StorageError:
                out.append(f"no SA-1B JSON {path.name} in {self.location}")
                continue
            except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
                out.append(f"{path.name} is not SA-1B annotations: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            out.append(masks if masks else f"no mask in {path.name}")
        return out


_KINDS: dict[str, type[ProposalSource]] = {"coco": CocoProposals, "sa1b": Sa1bProposals}


def list_proposal_sources() -> list[str]:
    """The kinds ``--proposals KIND:LOCATION`` accepts: ``coco``, ``sa1b`` (``sam``, the default, generates masks)."""
    return sorted(_KINDS)


def parse_proposals(spec: str) -> tuple[str, str]:
    """Split ``KIND:LOCATION``; ``sam`` alone means SAM's generator.

    Raises:
        SourceError: unknown kind (the message lists the valid ones) or no location.
    """
    if spec == "sam":
        return "sam", ""
    kind, sep, location = spec.partition(":")
    if not sep or kind not in _KINDS or not location:
        raise SourceError(
            f"--proposals must be sam, or KIND:LOCATION with KIND one of {', '.join(list_proposal_sources())}; "
            f"got {spec!r}"
        )
    return kind, location


def build_proposal_source(kind: str, location: str) -> ProposalSource:
    """The given-mask source of ``kind`` at ``location``.

    Raises:
        SourceError: unknown kind (the message lists the valid ones).
    """
    if kind not in _KINDS:
        raise SourceError(f"unknown proposals kind {kind!r}; valid: sam, {', '.join(list_proposal_sources())}")
    return _KINDS[kind](location)
