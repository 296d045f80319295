"""What the benchmarks share: COCO records, nouns (spaCy or a JSON file), the benchmark config, and the mining
stages run in-process without Ray (decode -> GPU stage -> finalize), each timed.

Nothing here needs Ray or spaCy unless asked for (nouns from spaCy): the GPU check (``gpu_check.py``) runs on a
machine that has neither.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
COCO_MINI = Path(os.environ.get("OVSEG_MINE_COCO_MINI", REPO.parent / "shared" / "data" / "coco-mini"))
SAMPLE = REPO / "ovseg_mine" / "data" / "coco-sample"
SAMPLE_NOUNS = Path(__file__).resolve().parent / "data" / "coco_sample_nouns.json"
ID_STRIDE = 10_000_000  # copy k of image i gets id i + k * ID_STRIDE
#: Overrides for a quick run with the test suite's tiny random models (SAM ``tiny``: 256 px input; CLIP
#: ``ovseg-tiny-vit``): random tiny masks pass no score filter, so the filters are off (as the ``smoke`` recipe),
#: with at most 16 masks per image and CLIP calls of 16 crops.
TINY_MODELS = [
    "sam.model_type='tiny'",
    "clip.arch='ovseg-tiny-vit'",
    "sam.pred_iou_thresh=0.0",
    "sam.stability_score_thresh=0.0",
    "sam.max_masks_per_image=16",
    "clip.batch_size=16",
]


def coco_records(captions: Path, images: Path, n: int, *, captions_per_image: int = 1) -> list[dict[str, Any]]:
    """The first ``n`` images of a COCO captions file by id, as the driver's records (first caption, as the
    paper); images are repeated under new ids (``+ k * ID_STRIDE``) when ``n`` exceeds the file's."""
    coco = json.loads(captions.read_text(encoding="utf-8"))
    by_image: dict[int, list[str]] = {}
    for ann in sorted(coco["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    listed = sorted(coco["images"], key=lambda im: im["id"])
    records = []
    for i in range(n):
        im = listed[i % len(listed)]
        records.append(
            {
                "image_id": im["id"] + (i // len(listed)) * ID_STRIDE,
                "source_id": im["id"],
                "file_name": im["file_name"],
                "path": str(images / im["file_name"]),
                "width": im["width"],
                "height": im["height"],
                "captions": by_image[im["id"]][:captions_per_image],
            }
        )
    return records


def sample_records(n: int) -> list[dict[str, Any]]:
    """:func:`coco_records` of the bundled 16-image sample (present in every checkout)."""
    return coco_records(SAMPLE / "captions.json", SAMPLE / "images", n)


def nouns_with_spacy(records: list[dict[str, Any]]) -> dict[int, dict[str, list]]:
    """Nouns of each record's captions by source image id (spaCy, as the noun stage extracts them)."""
    from ovseg_mine.mine.algorithms.nouns import extract_nouns, load_nlp

    per_image = extract_nouns(load_nlp(), [r["captions"] for r in records])
    return {
        r.get("source_id", r["image_id"]): {
            "nouns": [n.text for n in nouns],
            "noun_caption_index": [n.caption_index for n in nouns],
        }
        for r, nouns in zip(records, per_image, strict=True)
    }


def with_nouns(records: list[dict[str, Any]], nouns: dict[int, dict[str, list]]) -> list[dict[str, Any]]:
    """Records with the noun stage's columns (``nouns``, ``noun_caption_index``, ``nouns_s`` = 0), from a table of
    nouns by source image id (:func:`nouns_with_spacy` or a JSON file written from it)."""
    out = []
    for record in records:
        found = nouns[record.get("source_id", record["image_id"])]
        row = {k: v for k, v in record.items() if k != "source_id"}
        out.append({**row, **found, "nouns_s": 0.0})
    return out


def load_nouns_json(path: Path) -> dict[int, dict[str, list]]:
    """A nouns table written by ``mine_benchmark.py nouns-json`` (keys are image ids as strings)."""
    return {int(k): v for k, v in json.loads(path.read_text(encoding="utf-8")).items()}


def bench_config(points_per_side: int, precision: str, sam_checkpoint: str, extra: list[str] | None = None) -> Any:
    """``coco-ovseg`` with seeded random (calibrated) weights and the benchmark's filters
    (:func:`calibration.settings`), in ``precision`` (``bf16`` or ``fp32`` for SAM and CLIP)."""
    from calibration import settings

    from ovseg_mine.config import build_config

    overrides = [
        f"sam.checkpoint={sam_checkpoint}",
        "clip.pretrained=random",
        f"sam.precision={precision!r}",
        f"clip.precision={precision!r}",
        *settings(points_per_side),
        *(extra or []),
    ]
    return build_config("coco-ovseg", overrides)


class StageRunner:
    """The mining stages after nouns, in this process: :func:`~ovseg_mine.mine.graph.stages.decode_stage`,
    :class:`~ovseg_mine.mine.graph.stages.MaskMatchStage` (models loaded once),
    :func:`~ovseg_mine.mine.graph.stages.finalize_stage`."""

    def __init__(self, cfg: Any) -> None:
        from ovseg_mine.mine.graph.stages import MaskMatchStage
        from ovseg_mine.mine.graph.weights import resolve_weights
        from ovseg_mine.models import sam_input_size

        self.cfg = cfg
        self.stage = MaskMatchStage(cfg, resolve_weights(cfg))
        self.engine = self.stage.engine
        self.sam_input_size = sam_input_size(cfg.sam.model_type)

    def decode(self, rows: list[dict[str, Any]]) -> Any:
        import pyarrow as pa

        from ovseg_mine.mine.graph.stages import decode_stage

        return decode_stage(pa.Table.from_pylist(rows), sam_input_size=self.sam_input_size)

    def run(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Mine ``rows`` (records with nouns) as one GPU-stage batch; returns the result rows and wall seconds
        per stage (``decode``, ``gpu``, ``finalize``; the GPU stage's own steps are in the rows' ``*_s``)."""
        from ovseg_mine.mine.graph.stages import finalize_stage

        seconds = {}
        start = time.perf_counter()
        decoded = self.decode(rows)
        seconds["decode"] = time.perf_counter() - start
        start = time.perf_counter()
        matched = self.stage(decoded)
        _sync(self.engine.device)
        seconds["gpu"] = time.perf_counter() - start
        start = time.perf_counter()
        results = finalize_stage(matched).to_pylist()
        seconds["finalize"] = time.perf_counter() - start
        return results, seconds


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
