"""Hand-made run folders with known answers (pairs, ground truth) for inspect, report, publish and export tests, and
the comparison of two runs' pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from ovseg_mine import rle
from ovseg_mine.done_record import DoneRecord, ImageStatus
from ovseg_mine.shards import marker_location, pair_schema, sha256_file, write_shard

SCORE_COLUMNS = ("similarity", "probability", "margin", "predicted_iou", "stability_score")


def assert_same_pairs(first: list[dict], second: list[dict], *, atol: float = 1e-5) -> None:
    """The determinism contract across workers, threads and batching: the same pairs in the same order, every
    column equal (noun, mask RLE, bbox, ids, caption...) except the float scores, which agree within ``atol``."""
    assert len(first) == len(second), (len(first), len(second))
    for a, b in zip(first, second, strict=True):
        assert {k: v for k, v in a.items() if k not in SCORE_COLUMNS} == {
            k: v for k, v in b.items() if k not in SCORE_COLUMNS
        }, (a["pair_id"], b["pair_id"])
        for column in SCORE_COLUMNS:
            if a[column] is None or b[column] is None:
                assert a[column] is b[column], (a["pair_id"], column)
            else:
                assert abs(a[column] - b[column]) <= atol, (a["pair_id"], column, a[column], b[column])


H, W = 10, 20


CATEGORIES = [
    {"id": 1, "name": "person"},
    {"id": 17, "name": "cat"},
    {"id": 18, "name": "dog"},
    {"id": 24, "name": "zebra"},
]


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """bool [H, W] mask, True on rows y0:y1, columns x0:x1."""
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# A polygon ground truth; the mined "puppy" mask is its exact rasterization (pycocotools), so IoU is 1.
DOG_POLYGON = [[0.0, 0.0, 10.0, 0.0, 10.0, 5.0, 0.0, 5.0]]


def polygon_mask() -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(DOG_POLYGON, H, W))).astype(bool)


def _pair(image_id: int, noun: str, mask: np.ndarray, caption: str, sim: float, **extra) -> dict:
    enc = rle.encode(mask)
    return {
        "pair_id": f"{image_id}:{noun}",
        "image_id": image_id,
        "file_name": f"{image_id}.png",
        "width": W,
        "height": H,
        "caption_index": 0,
        "caption": caption,
        "noun": noun,
        "mask": enc,
        "bbox": [int(v) for v in rle.bbox(enc)],
        "area": int(mask.sum()),
        "proposal_index": 0,
        "num_proposals": 4,
        "similarity": sim,
        "probability": sim,
        "margin": extra.get("margin", 0.1),
        "predicted_iou": 0.9,
        "stability_score": 0.95,
    }


def handmade_pairs(caption: str = "a puppy and a man") -> list[dict]:
    """7 pairs in images 1 and 2 (image 3 has none); with :func:`write_gt`: IoUs puppy 1, man 0, dog 1, cat and
    kitten 0.5; zebra's category is not in image 1; sky maps to no category; cat and kitten share one mask."""
    return [
        _pair(1, "puppy", polygon_mask(), caption, 0.30),
        _pair(1, "man", box(5, 10, 10, 20), caption, 0.10),
        _pair(1, "zebra", box(0, 5, 10, 20), caption, 0.20),
        _pair(1, "sky", box(5, 10, 0, 10), caption, 0.05, margin=None),
        _pair(2, "dog", box(0, 10, 0, 10), "a dog, a cat", 0.40),
        _pair(2, "cat", box(0, 10, 10, 20), "a dog, a cat", 0.25),
        _pair(2, "kitten", box(0, 10, 10, 20), "a dog, a kitten", 0.15),
    ]


def remark_shard(run: Path, index: int) -> None:
    """Rewrite shard ``index``'s done marker for the file's current bytes, as a writer that followed the commit
    protocol would have (for tests of what readers do with a consistently committed, but odd, shard)."""
    marker = Path(marker_location(run, index))
    record = json.loads(marker.read_text())
    record["sha256"] = sha256_file(run / record["file"])
    marker.write_text(json.dumps(record))


def make_run(root: Path, pairs: list[dict] | None = None, image_root: Path | None = None) -> Path:
    """A run folder with one shard of ``pairs`` (default :func:`handmade_pairs`) for images 1, 2, 3."""
    pairs = handmade_pairs() if pairs is None else pairs
    run = root / "run"
    images = [
        ImageStatus(i, "ok", "", W, H, num_nouns=4, num_proposals=4, num_pairs=sum(p["image_id"] == i for p in pairs))
        for i in (1, 2)
    ]
    reason = "all 2 nouns below the matching thresholds"
    images.append(ImageStatus(3, "matching", reason, W, H, num_nouns=2, num_proposals=3, num_pairs=0))
    table = pa.Table.from_pylist(pairs, schema=pair_schema())
    write_shard(
        run,
        0,
        table,
        file_metadata={"config": {}},
        row_group_size=100,
        done_record=DoneRecord(shard=0, image_ids=(1, 2, 3), images=tuple(images)),
    )
    manifest = {
        "schema_version": 1,
        "status": "complete",
        "weights": "pretrained",
        "source": {"captions": "captions.json", "image_root": str(image_root or root / "images")},
        "rejects": [{"image_id": 3, "file_name": "3.png", "stage": "matching", "reason": "below thresholds"}],
    }
    (run / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return run


def write_gt(path: Path, image_ids: tuple[int, ...] = (1, 2, 3)) -> Path:
    """COCO instances: image 1 dog (polygon) + person; image 2 dog as two RLE halves + cat (top half of the
    mined cat mask)."""

    def ann(aid: int, image_id: int, cat: int, seg) -> dict:
        return {
            "id": aid,
            "image_id": image_id,
            "category_id": cat,
            "segmentation": seg,
            "iscrowd": 0,
            "area": 1,
            "bbox": [0, 0, 1, 1],
        }

    anns = [
        ann(1, 1, 18, DOG_POLYGON),
        ann(2, 1, 1, rle.encode(box(0, 5, 10, 20))),
        ann(3, 2, 18, rle.encode(box(0, 5, 0, 10))),
        ann(4, 2, 18, rle.encode(box(5, 10, 0, 10))),
        ann(5, 2, 17, rle.encode(box(0, 5, 10, 20))),
    ]
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": W, "height": H} for i in image_ids],
        "annotations": [a for a in anns if a["image_id"] in image_ids],
        "categories": CATEGORIES,
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path
