"""The run manifest (``schemas/manifest-v1.schema.json``), built from the done records of a run's shards."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ovseg_mine import __version__
from ovseg_mine.config import MineConfig, config_hash
from ovseg_mine.mine.sources import ImageRecord, Source
from ovseg_mine.mine.weights import ResolvedWeights
from ovseg_mine.shards import SCHEMA_VERSION, read_table, sha256_file
from ovseg_mine.storage import Location


def build_manifest(
    out: Location,
    source: Source,
    cfg: MineConfig,
    weights: ResolvedWeights,
    done: dict[int, dict],
    plan: dict[int, list[ImageRecord]],
    wall_s: float,
    processed: int,
) -> dict[str, Any]:
    """The run manifest (schemas/manifest-v1.schema.json) from the done shards of ``plan``."""
    shards, rejects, warned = [], [r.to_dict() for r in source.rejects], []
    images = with_pairs = proposals = pairs = 0
    nouns: set[str] = set()
    stage_s: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for index in sorted(plan):
        record = done.get(index)
        if record is None:
            continue
        shards.append(
            {
                "file": record["file"],
                "rows": record["rows"],
                "sha256": record["sha256"],
                "images": len(record["image_ids"]),
            }
        )
        rejects.extend(record["rejects"])
        warned.extend(record.get("warnings", []))
        images += len(record["images"])
        with_pairs += sum(1 for image in record["images"] if image["num_pairs"])
        proposals += sum(image["num_proposals"] for image in record["images"])
        pairs += record["rows"]
        stage_s.update(record.get("stage_s", {}))
        errors.update(image["error_type"] for image in record["images"] if image.get("error_type"))
        if record["rows"]:
            nouns.update(read_table(out.join(record["file"]), columns=["noun"]).column("noun").to_pylist())
    complete = all(index in done for index in plan)
    return {
        "schema_version": SCHEMA_VERSION,
        "package_version": __version__,
        "status": "complete" if complete else "partial",
        "config": cfg.model_dump(mode="json"),
        "config_hash": config_hash(cfg),
        "models": weights.models,
        "weights": "random" if weights.random else "pretrained",
        "source": {
            "captions": source.captions_path,
            "captions_sha256": sha256_file(source.captions_path),
            "image_root": source.image_root,
            "images_in_file": source.num_images_in_file,
            "images_selected": len(source.records),
        },
        "shards": shards,
        "counts": {
            "images": images,
            "images_with_pairs": with_pairs,
            "images_rejected": len(rejects),
            "pairs": pairs,
            "unique_nouns": len(nouns),
            "proposals": proposals,
            "rejects_by_stage": dict(Counter(r["stage"] for r in rejects)),
            "errors_by_type": dict(sorted(errors.items())),
            "images_with_warnings": len(warned),
        },
        "rejects": rejects,
        "warnings": warned,
        "timings": {
            "wall_s": round(wall_s, 3),
            "images_per_s": round(processed / wall_s, 4) if wall_s > 0 else 0.0,
            "images_this_invocation": processed,
            "stage_s": {k: round(v, 3) for k, v in stage_s.items()},
        },
    }
