"""COCO ground truth: instance or panoptic annotations as per-image masks (COCO RLE), for ``inspect --gt``
(agreement of mined pairs with the annotations) and ``evaluate`` (classification of the annotated masks).

The two COCO formats (cocodataset.org/#format-data) are read the same way:

* instances (``instances_*.json``): ``images``, ``categories`` and ``annotations``, each with ``image_id``,
  ``category_id``, ``segmentation`` (polygons, uncompressed RLE for ``iscrowd`` groups, or compressed RLE),
  ``iscrowd`` and ``area`` (pixels);
* panoptic (``panoptic_*.json``): one annotation per image naming its PNG (``file_name``, in the folder beside
  the JSON with the same name without ``.json``, e.g. ``panoptic_val2017/``) and its ``segments_info``
  (``id``, ``category_id``, ``iscrowd``, ``area``); a pixel belongs to segment ``R + 256 G + 256^2 B``.

An *annotation* below is an instance annotation dict, or a panoptic ``segments_info`` entry: both have
``category_id``, ``iscrowd`` and ``area``. Masks are COCO RLE ``{"size": [H, W], "counts": str}`` through
:mod:`ovseg_mine.rle` (pycocotools). Annotations that cannot give a mask are left out and counted, never lost
silently.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ovseg_mine import rle


class GroundTruthError(ValueError):
    """A ground-truth file that cannot be read as COCO annotations; the message says why, in one line."""


class GroundTruth:
    """COCO instance or panoptic annotations of a set of images.

    Args:
        path: ``instances_*.json`` or ``panoptic_*.json``.

    Attributes:
        path: the file.
        kind: ``"instances"`` or ``"panoptic"`` (panoptic when the annotations carry ``segments_info``).
        categories: ``{category id: name}`` in id order.
        images: ``{image id: COCO image dict}`` (``file_name``, ``width``, ``height``).
        left_out: annotations ignored at load, by reason: ``no_segmentation`` (an instance annotation with
            an empty or missing ``segmentation``), ``image_not_listed`` (its image is not in ``images``).

    Raises:
        GroundTruthError: the file is missing, not JSON, or not COCO annotations (needs images, annotations,
            categories).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.categories = {int(c["id"]): str(c["name"]) for c in sorted(data["categories"], key=lambda c: c["id"])}
            self.images: dict[int, dict[str, Any]] = {int(im["id"]): im for im in data["images"]}
            annotations = list(data["annotations"])
            self.kind = "panoptic" if annotations and "segments_info" in annotations[0] else "instances"
            self._by_image = self._index(annotations)
        except FileNotFoundError as exc:
            raise GroundTruthError(f"ground-truth file {self.path} not found") from exc
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GroundTruthError(f"ground-truth file {self.path} is not readable JSON: {exc}") from exc
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise GroundTruthError(
                f"{self.path} is not COCO annotations (needs images, annotations, categories)"
            ) from exc
        self._unions: dict[int, dict[int, dict[str, Any]]] = {}

    def _index(self, annotations: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
        by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.left_out = {"no_segmentation": 0, "image_not_listed": 0}
        self._png: dict[int, str] = {}
        for a in annotations:
            image_id = int(a["image_id"])
            if image_id not in self.images:
                self.left_out["image_not_listed"] += 1
            elif self.kind == "panoptic":
                self._png[image_id] = a["file_name"]
                by_image[image_id].extend(a["segments_info"])
            elif not a.get("segmentation"):
                self.left_out["no_segmentation"] += 1
            else:
                by_image[image_id].append(a)
        return dict(by_image)

    @property
    def num_annotations(self) -> int:
        """Annotations (instances, or panoptic segments) with a mask, over all images."""
        return sum(len(v) for v in self._by_image.values())

    def annotations(self, image_id: int) -> list[dict[str, Any]]:
        """The annotations of one image (empty when the file has none for it), in file order."""
        return self._by_image.get(image_id, [])

    def rles(self, image_id: int, annotations: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """The masks of ``annotations`` of one image (default: all of them), one COCO RLE each, in order.

        Raises:
            GroundTruthError: a panoptic PNG that is missing; a malformed segmentation.
        """
        annotations = self.annotations(image_id) if annotations is None else annotations
        if not annotations:
            return []
        image = self.images[image_id]
        if self.kind == "panoptic":
            return rle.encode_many(self._segment_masks(image_id, [int(s["id"]) for s in annotations]))
        try:
            return [
                rle.from_segmentation(a["segmentation"], int(image["height"]), int(image["width"])) for a in annotations
            ]
        except rle.RLEError as exc:
            raise GroundTruthError(f"{self.path}: image {image_id}: {exc}") from exc

    def _segment_masks(self, image_id: int, segment_ids: list[int]) -> np.ndarray:
        from PIL import Image

        png = self.path.with_suffix("") / self._png[image_id]
        if not png.is_file():
            raise GroundTruthError(f"panoptic PNG {png} not found (expected beside {self.path.name})")
        with Image.open(png) as handle:
            rgb = np.asarray(handle.convert("RGB"), dtype=np.uint32)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        return ids[None] == np.asarray(segment_ids, dtype=np.uint32)[:, None, None]

    def category_masks(self, image_id: int) -> dict[int, dict[str, Any]]:
        """``{category id: union of its masks as COCO RLE}`` of one image, crowd groups included (empty when the
        file has no annotation for it). Cached per image.

        Raises:
            GroundTruthError: as :meth:`rles`.
        """
        if image_id not in self._unions:
            by_category: dict[int, list[dict[str, Any]]] = defaultdict(list)
            for a, mask in zip(self.annotations(image_id), self.rles(image_id), strict=True):
                by_category[int(a["category_id"])].append(mask)
            self._unions[image_id] = {c: rle.union(masks) for c, masks in by_category.items()}
        return self._unions[image_id]

    def select(
        self,
        *,
        min_area: float = 0,
        include_crowd: bool = False,
        images_root: str | os.PathLike[str] | None = None,
        limit: int | None = None,
    ) -> "Selection":
        """The annotations to score, image by image, with what was left out counted.

        Args:
            min_area: leave out annotations whose ``area`` (pixels) is below this (``tiny``).
            include_crowd: keep ``iscrowd=1`` annotations (a group of objects); left out by default (``crowd``).
            images_root: when given, leave out the annotations of images whose file is not under it
                (``missing_image``; the file names are listed).
            limit: only the first N images of the file, by id (with or without annotations).

        Returns:
            A :class:`Selection`.
        """
        selection = Selection(self, Path(images_root) if images_root is not None else None)
        skipped = selection.skipped
        for image_id in sorted(self.images)[:limit]:
            annotations = self.annotations(image_id)
            if not annotations:
                continue
            if images_root is not None and not selection.image_path(image_id).is_file():
                selection.missing_images.append(self.images[image_id]["file_name"])
                skipped["missing_image"] += len(annotations)
                continue
            kept = []
            for a in annotations:
                if a.get("iscrowd") and not include_crowd:
                    skipped["crowd"] += 1
                elif a.get("area", 0) < min_area:
                    skipped["tiny"] += 1
                else:
                    kept.append(a)
            if kept:
                selection.by_image[image_id] = kept
        return selection


@dataclass
class Selection:
    """Annotations of a :class:`GroundTruth` chosen by :meth:`GroundTruth.select`.

    Attributes:
        gt: the ground truth.
        images_root: folder of the images (``file_name`` relative to it), or None.
        by_image: ``{image id: [annotation, ...]}`` of the annotations kept, images in id order.
        skipped: annotations left out, by reason: ``crowd``, ``tiny``, ``missing_image`` (callers may add
            their own reasons).
        missing_images: file names of the images not found under ``images_root``.
    """

    gt: GroundTruth
    images_root: Path | None
    by_image: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=lambda: {"crowd": 0, "tiny": 0, "missing_image": 0})
    missing_images: list[str] = field(default_factory=list)

    @property
    def annotations(self) -> int:
        """Annotations kept, over all images of ``by_image``."""
        return sum(len(v) for v in self.by_image.values())

    @property
    def categories(self) -> dict[int, str]:
        """The ground truth's ``{category id: name}``, in id order."""
        return self.gt.categories

    def image_path(self, image_id: int) -> Path:
        """Where the image's file is: ``images_root / file_name``."""
        return (self.images_root or Path()) / self.gt.images[image_id]["file_name"]

    def masks(self, image_id: int) -> np.ndarray:
        """bool ``[N, H, W]`` masks of the N kept annotations of one image, in ``by_image`` order.

        Raises:
            GroundTruthError: as :meth:`GroundTruth.rles`.
        """
        return np.stack([rle.decode(r) for r in self.gt.rles(image_id, self.by_image[image_id])])
