"""Label maps and class lists of semantic-segmentation benchmarks.

A *label map* is a single-channel PNG or TIFF, uint8 or uint16, one class index per pixel, the size of its image
(detectron2's ``load_sem_seg`` layout: one map per image, same stem). Its *raw* values are read and turned into
*train ids* ``[0, K)``, with ``K`` standing for ignored pixels:

* ``ignore_label`` (default 255; 65535 for detectron2's uint16 maps of ADE-847 and PC-459) -> ignored;
* with ``reduce_zero_label`` (mmsegmentation's term, for the official raw ADE20K maps where 0 = "other" and k =
  class k): 0 -> ignored, k -> k - 1, and the ignore value stays ignored. detectron2's
  ``prepare_ade20k_sem_seg.py`` writes the same conversion to ``annotations_detectron2/``.

A *class list* is a text file with one class per line; a line may list synonyms separated by ``;``
(``building;edifice``, as ADE20K's ``objectInfo150.csv``): the first one names the class (and is the word the
text tower embeds, as detectron2's and OVSeg's ADE-150 metadata); blank lines and lines starting with ``#`` are
skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class LabelError(ValueError):
    """A label map, prediction or class list that cannot be used; the message names the file and says why."""


@dataclass(frozen=True)
class ClassList:
    """The classes of a benchmark.

    Attributes:
        names: K class names (the first synonym of each line), in train-id order.
        synonyms: the K lines' synonyms (each a tuple, its first entry the name).
        source: the file they were read from.
    """

    names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]
    source: str

    def __len__(self) -> int:
        return len(self.names)


def read_classes(path: str | os.PathLike[str]) -> ClassList:
    """Read a class list (see the module docstring).

    Raises:
        LabelError: missing or unreadable file, no class in it, or a class name given twice (named, with lines).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelError(f"class list {path} cannot be read: {exc}") from exc
    synonyms: list[tuple[str, ...]] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = tuple(w.strip() for w in line.split(";") if w.strip())
        if words[0] in first_line:
            lines_at = f"lines {first_line[words[0]]} and {number}"
            raise LabelError(f"class list {path}: {words[0]!r} is given twice ({lines_at})")
        first_line[words[0]] = number
        synonyms.append(words)
    if not synonyms:
        raise LabelError(f"class list {path} has no class (one name per line)")
    return ClassList(tuple(s[0] for s in synonyms), tuple(synonyms), str(path))


def read_indices(path: str | os.PathLike[str], classes: ClassList) -> list[int]:
    """Train ids of the class names listed in ``path`` (one per line, e.g. ``--seen-classes``).

    Raises:
        LabelError: unreadable file, or a name that is not one of ``classes`` (named).
    """
    listed = read_classes(path)
    index = {n: i for i, n in enumerate(classes.names)}
    unknown = [n for n in listed.names if n not in index]
    if unknown:
        raise LabelError(f"{path}: {len(unknown)} names are not classes of {classes.source}: {unknown[:5]}")
    return [index[n] for n in listed.names]


def read_label_map(path: str | os.PathLike[str]) -> np.ndarray:
    """Raw values of a single-channel label map: uint8 or uint16 ``[H, W]``.

    Raises:
        LabelError: missing or undecodable file, or not a single-channel 8/16-bit image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise LabelError(f"label map {path} cannot be read: {exc}") from exc
    if array.ndim != 2:
        raise LabelError(f"label map {path} has {array.shape[2] if array.ndim == 3 else '?'} channels, expected 1")
    if array.dtype == np.int32 or array.dtype == np.int16:  # PIL's "I" mode for some 16-bit files
        if array.size and (int(array.min()) < 0 or int(array.max()) > 65535):
            raise LabelError(f"label map {path} has values outside uint16")
        array = array.astype(np.uint16)
    if array.dtype not in (np.uint8, np.uint16):
        raise LabelError(f"label map {path} is {array.dtype}, expected uint8 or uint16")
    return array


def to_train_ids(
    raw: np.ndarray, num_classes: int, *, ignore_label: int = 255, reduce_zero_label: bool = False, path: str = ""
) -> np.ndarray:
    """Raw label values -> int64 train ids ``[H, W]`` in ``[0, K]``, K = ignored (see the module docstring).

    Raises:
        LabelError: a value that is neither the ignore value nor a class (``path`` and the value named).
    """
    values = raw.astype(np.int64)
    ignored = values == ignore_label
    if reduce_zero_label:
        ignored |= values == 0
        values = values - 1
    bad = ~ignored & ((values < 0) | (values >= num_classes))
    if bad.any():
        value = int(raw[bad].flat[0])
        raise LabelError(
            f"{path}: label value {value} is outside the {num_classes} classes "
            f"(raw values {'1' if reduce_zero_label else '0'}..{num_classes - (0 if reduce_zero_label else 1)}, "
            f"ignore {ignore_label}{', 0 with --reduce-zero-label' if reduce_zero_label else ''})"
        )
    values[ignored] = num_classes
    return values


def from_train_ids(pred: np.ndarray, num_classes: int, *, ignore_label: int = 255, reduce_zero_label: bool = False):
    """Predicted train ids ``[0, K]`` (K: no class) -> raw values in the ground truth's label space: class c is
    written ``c`` (``c + 1`` with ``reduce_zero_label``), no class the ignore value (0 with ``reduce_zero_label``).
    uint8 when every value fits, else uint16. :func:`to_train_ids` reads it back to the same train ids."""
    if reduce_zero_label:
        raw = pred.astype(np.int64) + 1
        raw[pred == num_classes] = 0
    else:
        raw = pred.astype(np.int64)
        raw[pred == num_classes] = ignore_label
    top = max(int(raw.max()) if raw.size else 0, ignore_label)
    return raw.astype(np.uint8 if top <= 255 else np.uint16)


def write_label_map(path: str | os.PathLike[str], raw: np.ndarray) -> None:
    """Write uint8 or uint16 ``[H, W]`` raw values as a PNG (8- or 16-bit greyscale), whole (temporary name, then
    rename)."""
    from PIL import Image

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(np.ascontiguousarray(raw)).save(tmp, format="PNG")
    os.replace(tmp, path)
