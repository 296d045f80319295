"""The run manifest (``schemas/manifest-v1.schema.json``), built from the done records of a run's shards."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
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
    wanted = set(cfg.source.image_ids or ()) if cfg.source.kind != "coco" else set()
    totals = _ShardTotals(rejects=list(plan.rejects))
    for task in plan.tasks:
        if task.index in done:
            totals.add(out, done[task.index], wanted)
    complete = all(task.index in done for task in plan.tasks)
    if complete:
        totals.rejects.extend(
            Reject(i, None, "source", "image id not in the source") for i in sorted(wanted - totals.found)
        )
    rejects = [r.to_json() for r in totals.rejects]
    return {
        "schema_version": SCHEMA_VERSION,
        "package_version": __version__,
        "status": "complete" if complete else "partial",
        "config": cfg.model_dump(mode="json"),
        "config_hash": config_hash(cfg),
        "models": weights.models,
        "weights": "random" if weights.random else "pretrained",
        "source": _source_section(plan, totals.shards),
        "proposals": proposals_info,
        "shards": totals.shards,
        "counts": totals.counts(rejects),
        "rejects": rejects,
        "warnings": [r.to_json() for r in totals.warnings],
        "timings": {
            "wall_s": round(wall_s, 3),
            "images_per_s": round(processed / wall_s, 4) if wall_s > 0 else 0.0,
            "images_this_invocation": processed,
            "stage_s": {k: round(v, 3) for k, v in totals.stage_s.items()},
        },
    }


@dataclass
class _ShardTotals:
    """What the manifest sums over the done shards, in plan order.

    Attributes:
        shards: the manifest's ``shards`` entries (file, rows, sha256, images, input).
        rejects: the plan's rejects, then each shard's.
        warnings: each shard's warnings.
        images, images_with_pairs, proposals, pairs: counts over the shards' images.
        nouns: the distinct nouns of the shards' pairs (read from the shard files).
        stage_s: seconds per stage.
        errors: failed images by exception type (``error_type``).
        found: the ids of ``source.image_ids`` that a shard holds.
    """

    shards: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    warnings: list[Reject] = field(default_factory=list)
    images: int = 0
    images_with_pairs: int = 0
    proposals: int = 0
    pairs: int = 0
    nouns: set[str] = field(default_factory=set)
    stage_s: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    found: set[int] = field(default_factory=set)

    def add(self, out: Location, record: DoneRecord, wanted: set[int]) -> None:
        """Add one done shard of the run in ``out``; ``wanted``: the ids ``source.image_ids`` names, if any."""
        self.shards.append(
            {
                "file": record.file,
                "rows": record.rows,
                "sha256": record.sha256,
                "images": len(record.image_ids),
                "input": record.input,
            }
        )
        self.found.update(i for i in record.image_ids if i in wanted)
        self.rejects.extend(record.rejects)
        self.warnings.extend(record.warnings)
        self.images += len(record.images)
        self.images_with_pairs += sum(1 for image in record.images if image.num_pairs)
        self.proposals += sum(image.num_proposals for image in record.images)
        self.pairs += record.rows
        self.stage_s.update(record.stage_s)
        self.errors.update(image.error_type for image in record.images if image.error_type)
        if record.rows:
            self.nouns.update(read_table(out.join(record.file), columns=["noun"]).column("noun").to_pylist())

    def counts(self, rejects: list[dict[str, Any]]) -> dict[str, Any]:
        """The manifest's ``counts``; ``rejects``: the manifest's, as JSON."""
        return {
            "images": self.images,
            "images_with_pairs": self.images_with_pairs,
            "images_rejected": len(rejects),
            "pairs": self.pairs,
            "unique_nouns": len(self.nouns),
            "proposals": self.proposals,
            "rejects_by_stage": dict(Counter(r["stage"] for r in rejects)),
            "errors_by_type": dict(sorted(self.errors.items())),
            "images_with_warnings": len(self.warnings),
        }


def _source_section(plan: SourcePlan, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's ``source``: the plan's description, the image root, the images selected (the plan's exact
    count, else the done shards')."""
    source = dict(plan.info)
    if plan.image_root is not None:
        source["image_root"] = plan.image_root
    exact = plan.exact_total
    source["images_selected"] = exact if exact is not None else sum(s["images"] for s in shards)
    return source
