"""The paper's benchmarks in detectron2's folder layout, and the image/label-map pairs of a benchmark.

OVSeg (Liang et al., CVPR 2023, Table 1) reports mIoU on ADE20K-150, ADE20K-847, Pascal Context 59 and 459 and
Pascal VOC 20. Its ``datasets/DATASETS.md`` and ``prepare_*.py`` scripts (and detectron2's
``prepare_ade20k_sem_seg.py``) write these folders under ``$DETECTRON2_DATASETS`` (default ``./datasets``),
as registered by ``open_vocab_seg/data/datasets/register_*.py``:

- ``ade150``: ``ADEChallengeData2016/images/validation`` and ``ADEChallengeData2016/annotations_detectron2/
  validation`` (PNG, uint8, ignore 255);
- ``ade847``: ``ADE20K_2021_17_01/images_detectron2/validation`` and ``ADE20K_2021_17_01/annotations_detectron2/
  validation`` (TIFF, uint16, ignore 65535);
- ``pc59``: ``VOCdevkit/VOC2010/JPEGImages`` and ``VOCdevkit/VOC2010/annotations_detectron2/pc59_val`` (PNG, 255);
- ``pc459``: ``VOCdevkit/VOC2010/JPEGImages`` and ``VOCdevkit/VOC2010/annotations_detectron2/pc459_val`` (TIFF,
  uint16, 65535);
- ``voc20``: ``VOCdevkit/VOC2012/JPEGImages`` and ``VOCdevkit/VOC2012/annotations_detectron2/val`` (PNG, 255;
  background ignored).

ADE-150's class names ship with the package (``ovseg_mine/data/ade150_classes.txt``, from ADE20K's
``objectInfo150.csv``, synonyms kept); the others take ``--classes FILE`` (one name per line, in train-id order).
Label maps drive the pairing: every label map needs the image of the same stem (``.jpg``, ``.jpeg`` or ``.png``);
images without a label map are not evaluated (detectron2's ``load_sem_seg`` does the same).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ovseg_mine.evaluate.labels import LabelError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
LABEL_EXTENSIONS = (".png", ".tif", ".tiff")


@dataclass(frozen=True)
class Benchmark:
    """A known benchmark layout.

    Attributes:
        name: registry key (``ade150``...).
        images: image folder, relative to the datasets root.
        labels: label-map folder, relative to the datasets root.
        ignore_label: the maps' ignore value.
        num_classes: K.
        classes_file: bundled class list (file name under ``ovseg_mine/data``), or None (``--classes`` needed).
    """

    name: str
    images: str
    labels: str
    ignore_label: int
    num_classes: int
    classes_file: str | None = None


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "ade150",
            "ADEChallengeData2016/images/validation",
            "ADEChallengeData2016/annotations_detectron2/validation",
            255,
            150,
            "ade150_classes.txt",
        ),
        Benchmark(
            "ade847",
            "ADE20K_2021_17_01/images_detectron2/validation",
            "ADE20K_2021_17_01/annotations_detectron2/validation",
            65535,
            847,
        ),
        Benchmark("pc59", "VOCdevkit/VOC2010/JPEGImages", "VOCdevkit/VOC2010/annotations_detectron2/pc59_val", 255, 59),
        Benchmark(
            "pc459", "VOCdevkit/VOC2010/JPEGImages", "VOCdevkit/VOC2010/annotations_detectron2/pc459_val", 65535, 459
        ),
        Benchmark("voc20", "VOCdevkit/VOC2012/JPEGImages", "VOCdevkit/VOC2012/annotations_detectron2/val", 255, 20),
    )
}


def list_benchmarks() -> list[str]:
    """Names ``--benchmark`` accepts: ``ade150``, ``ade847``, ``pc459``, ``pc59``, ``voc20``."""
    return sorted(BENCHMARKS)


def get_benchmark(name: str) -> Benchmark:
    """The layout of ``name``.

    Raises:
        LabelError: unknown name (the message lists the valid ones).
    """
    if name not in BENCHMARKS:
        raise LabelError(f"unknown benchmark {name!r}; valid: {', '.join(list_benchmarks())}")
    return BENCHMARKS[name]


def datasets_root(root: str | os.PathLike[str] | None) -> Path:
    """``root``, else ``$DETECTRON2_DATASETS``, else ``./datasets`` (detectron2's rule)."""
    return Path(root if root is not None else os.environ.get("DETECTRON2_DATASETS", "datasets"))


def bundled_classes(benchmark: Benchmark) -> Path | None:
    """Path of the class list shipped for ``benchmark`` (None when it ships none)."""
    if benchmark.classes_file is None:
        return None
    return Path(__file__).resolve().parent.parent / "data" / benchmark.classes_file


@dataclass
class Pairs:
    """The image / label-map pairs of a benchmark, matched by stem.

    Attributes:
        items: ``(stem, image path, label path)``, sorted by stem.
        skipped: ``[(label file name, reason)]`` for label maps left out (no image of that stem).
    """

    items: list[tuple[str, Path, Path]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def pair_files(
    labels_dir: str | os.PathLike[str], images_dir: str | os.PathLike[str], limit: int | None = None
) -> Pairs:
    """Match every label map in ``labels_dir`` with the image of the same stem in ``images_dir``.

    Args:
        labels_dir: folder of label maps (``.png``, ``.tif``).
        images_dir: folder of images (``.jpg``, ``.jpeg``, ``.png``).
        limit: only the first N label maps by stem.

    Raises:
        LabelError: a folder is missing, or ``labels_dir`` holds no label map.
    """
    labels_dir, images_dir = Path(labels_dir), Path(images_dir)
    for what, folder in (("label-map", labels_dir), ("image", images_dir)):
        if not folder.is_dir():
            raise LabelError(f"{what} folder {folder} not found")
    labels = sorted((p for p in labels_dir.iterdir() if p.suffix.lower() in LABEL_EXTENSIONS), key=lambda p: p.stem)
    if not labels:
        raise LabelError(f"no label map (.png, .tif) in {labels_dir}")
    images: dict[str, Path] = {}
    for p in images_dir.iterdir():
        if p.suffix in IMAGE_EXTENSIONS:
            images.setdefault(p.stem, p)
    pairs = Pairs()
    for label in labels[:limit]:
        image = images.get(label.stem)
        if image is None:
            pairs.skipped.append((label.name, f"no image {label.stem}.jpg/.png in {images_dir}"))
        else:
            pairs.items.append((label.stem, image, label))
    return pairs
