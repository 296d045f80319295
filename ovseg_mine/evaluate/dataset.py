"""A semantic-segmentation benchmark read image by image: the image, its label map as train ids, and what was
left out (with the reason), for the two tasks and for scoring prediction files."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ovseg_mine.evaluate.benchmarks import (
    BENCHMARKS,
    bundled_classes,
    datasets_root,
    get_benchmark,
    pair_files,
)
from ovseg_mine.evaluate.labels import ClassList, LabelError, read_classes, read_indices, read_label_map, to_train_ids


@dataclass
class Sample:
    """One benchmark image.

    Attributes:
        stem: the shared file stem of image and label map.
        image_path, label_path: the files.
        gt: int64 ``[H, W]`` train ids in ``[0, K]`` (K: ignored).
        image: uint8 ``[H, W, 3]`` RGB, or None when the sample was read without its image.
    """

    stem: str
    image_path: Path
    label_path: Path
    gt: np.ndarray
    image: np.ndarray | None = None


@dataclass
class SemSegData:
    """The image/label-map pairs of a benchmark and how to read their labels.

    Attributes:
        name: the benchmark's name (``ade150``...) or ``custom``.
        pairs: the matched files (:func:`~ovseg_mine.evaluate.benchmarks.pair_files`).
        classes: the K classes.
        ignore_label, reduce_zero_label: how raw values become train ids (:mod:`ovseg_mine.evaluate.labels`).
        seen: train ids of the classes seen in training (``--seen-classes``), or None.
        skipped: ``[{"file", "reason"}]``: label maps left out (no image, another size than the image, an image
            that cannot be decoded); filled as samples are read.
    """

    name: str
    pairs: object
    classes: ClassList
    ignore_label: int = 255
    reduce_zero_label: bool = False
    seen: list[int] | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.skipped = [{"file": f, "reason": r} for f, r in self.pairs.skipped]

    def __len__(self) -> int:
        return len(self.pairs.items)

    def read_gt(self, label_path: Path) -> np.ndarray:
        """Train ids of one label map (see :func:`~ovseg_mine.evaluate.labels.to_train_ids`).

        Raises:
            LabelError: unreadable map, or a value outside the classes (file and value named).
        """
        raw = read_label_map(label_path)
        return to_train_ids(
            raw,
            len(self.classes),
            ignore_label=self.ignore_label,
            reduce_zero_label=self.reduce_zero_label,
            path=str(label_path),
        )

    def samples(self, *, with_images: bool = True) -> Iterator[Sample]:
        """The samples in stem order; a pair whose image cannot be decoded or differs in size from its label map
        is appended to :attr:`skipped` and not yielded.

        Raises:
            LabelError: as :meth:`read_gt`.
        """
        from ovseg_mine.images import ImageDecodeError, load_rgb

        for stem, image_path, label_path in self.pairs.items:
            gt = self.read_gt(label_path)
            image = None
            if with_images:
                try:
                    image = load_rgb(image_path)
                except ImageDecodeError as exc:
                    self.skipped.append({"file": label_path.name, "reason": f"image {image_path.name}: {exc}"})
                    continue
                if image.shape[:2] != gt.shape:
                    self.skipped.append(
                        {
                            "file": label_path.name,
                            "reason": f"label map is {gt.shape[1]}x{gt.shape[0]} but its image {image_path.name} "
                            f"is {image.shape[1]}x{image.shape[0]}",
                        }
                    )
                    continue
            yield Sample(stem, image_path, label_path, gt, image)

    def describe(self) -> dict[str, object]:
        """JSON-able summary: name, class source, K, ignore value, zero reduction, images."""
        return {
            "name": self.name,
            "classes": self.classes.source,
            "num_classes": len(self.classes),
            "ignore_label": self.ignore_label,
            "reduce_zero_label": self.reduce_zero_label,
            "label_maps": len(self.pairs.items) + len(self.pairs.skipped),
            "seen_classes": None if self.seen is None else len(self.seen),
        }


def open_benchmark(
    *,
    benchmark: str | None = None,
    root: str | os.PathLike[str] | None = None,
    labels_dir: str | os.PathLike[str] | None = None,
    images_dir: str | os.PathLike[str] | None = None,
    classes: str | os.PathLike[str] | None = None,
    ignore_label: int | None = None,
    reduce_zero_label: bool = False,
    seen_classes: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> SemSegData:
    """A known benchmark (``benchmark`` under ``root``, default ``$DETECTRON2_DATASETS``) or a custom one
    (``labels_dir`` + ``images_dir`` + ``classes``; ``classes`` may name a benchmark that ships its class list,
    e.g. ``ade150``). ``ignore_label`` defaults to the benchmark's (255 for a
    custom one); ``classes`` overrides a bundled list.

    Raises:
        LabelError: neither or both kinds given, missing folders or class list, bad class lists.
    """
    if (benchmark is None) == (labels_dir is None):
        raise LabelError("give either --benchmark NAME (with --root) or --sem-seg LABELS_DIR --images IMAGES_DIR")
    if benchmark is not None:
        known = get_benchmark(benchmark)
        base = datasets_root(root)
        labels_dir, images_dir = base / known.labels, base / known.images
        classes = classes or bundled_classes(known)
        if classes is None:
            raise LabelError(f"--benchmark {benchmark} ships no class names: give --classes FILE ({known.num_classes})")
        ignore = known.ignore_label if ignore_label is None else ignore_label
    else:
        if images_dir is None or classes is None:
            raise LabelError("--sem-seg needs --images IMAGES_DIR and --classes FILE")
        ignore = 255 if ignore_label is None else ignore_label
    if classes is not None and not Path(classes).exists() and str(classes) in BENCHMARKS:
        bundled = bundled_classes(BENCHMARKS[str(classes)])  # --classes ade150: the shipped list
        classes = bundled or classes
    class_list = read_classes(classes)
    if benchmark is not None and len(class_list) != known.num_classes:
        raise LabelError(f"{classes} lists {len(class_list)} classes but {benchmark} has {known.num_classes}")
    seen = read_indices(seen_classes, class_list) if seen_classes is not None else None
    pairs = pair_files(labels_dir, images_dir, limit=limit)
    return SemSegData(benchmark or "custom", pairs, class_list, ignore, reduce_zero_label, seen)
