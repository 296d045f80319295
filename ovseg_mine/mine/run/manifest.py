"""The run manifest (``schemas/manifest-v1.schema.json``), built from the done records of a run's shards."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ovseg_mine import __version__
from ovseg_mine.config import MineConfig, config_hash
from ovseg_mine.done_record import DoneRecord, Reject
from ovseg_mine.mine.graph.weights import ResolvedWeights
from ovseg_mine.mine.sources import SourcePlan
from ovseg_mine.shards import SCHEMA_VERSION, read_table
from ovseg_mine.storage import Location


def build_manifest(
    out: Location,
    plan: SourcePlan,
    cfg: MineConfig,
    weights: ResolvedWeights,
    proposals_info: dict[str, Any],
    done: dict[int, DoneRecord],
    wall_s: float,
    processed: int,
) -> dict[str, Any]:
    """The run manifest (schemas/manifest-v1.schema.json) from the done shards of ``plan``.

    ``proposals_info`` describes where the masks came from (``{"kind": "sam"}``, or the given-mask source's kind,
    location, sha256 and counts). When ``source.image_ids`` names ids that no shard of a complete run holds
    (sources whose ids are only known once read), each is listed as a reject (stage ``source``).
    """
    shards: list[dict[str, Any]] = []
    rejects: list[Reject] = list(plan.rejects)
    warned: list[Reject] = []
    images = with_pairs = proposals = pairs = 0
    nouns: set[str] = set()
    stage_s: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    found: set[int] = set()
    wanted = set(cfg.source.image_ids or ()) if cfg.source.kind != "coco" else set()
    for task in plan.tasks:
        record = done.get(task.index)
        if record is None:
            continue
        shards.append(
            {
                "file": record.file,
                "rows": record.rows,
                "sha256": record.sha256,
                "images": len(record.image_ids),
                "input": record.input,
            }
        )
        found.update(i for i in record.image_ids if i in wanted)
        rejects.extend(record.rejects)
        warned.extend(record.warnings)
        images += len(record.images)
        with_pairs += sum(1 for image in record.images if image.num_pairs)
        proposals += sum(image.num_proposals for image in record.images)
        pairs += record.rows
        stage_s.update(record.stage_s)
        errors.update(image.error_type for image in record.images if image.error_type)
        if record.rows:
            nouns.update(read_table(out.join(record.file), columns=["noun"]).column("noun").to_pylist())
    complete = all(task.index in done for task in plan.tasks)
    if complete:
        rejects.extend(Reject(i, None, "source", "image id not in the source") for i in sorted(wanted - found))
    listed = [r.to_json() for r in rejects]
    source = dict(plan.info)
    if plan.image_root is not None:
        source["image_root"] = plan.image_root
    exact = plan.exact_total
    source["images_selected"] = exact if exact is not None else sum(s["images"] for s in shards)
    return {
        "schema_version": SCHEMA_VERSION,
        "package_version": __version__,
        "status": "complete" if complete else "partial",
        "config": cfg.model_dump(mode="json"),
        "config_hash": config_hash(cfg),
        "models": weights.models,
        "weights": "random" if weights.random else "pretrained",
        "source": source,
        "proposals": proposals_info,
        "shards": shards,
        "counts": {
            "images": images,
            "images_with_pairs": with_pairs,
            "images_rejected": len(listed),
            "pairs": pairs,
            "unique_nouns": len(nouns),
            "proposals": proposals,
            "rejects_by_stage": dict(Counter(r["stage"] for r in listed)),
            "errors_by_type": dict(sorted(errors.items())),
            "images_with_warnings": len(warned),
        },
        "rejects": listed,
        "warnings": [r.to_json() for r in warned],
        "timings": {
            "wall_s": round(wall_s, 3),
            "images_per_s": round(processed / wall_s, 4) if wall_s > 0 else 0.0,
            "images_this_invocation": processed,
            "stage_s": {k: round(v, 3) for k, v in stage_s.items()},
        },
    }
