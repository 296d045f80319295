"""Mining as one Ray Data streaming pipeline: read step -> nouns -> proposals + matching -> shards.

The driver plans the source's shards (:meth:`~ovseg_mine.mine.sources.base.Source.plan`: light tasks, one per
output shard), skips shards already done with the same input, and streams the rest through the Ray stages: the
read step produces the records inside Ray, each stamped with its shard, the shard's size and its position in
it. The driver holds only the results of shards in flight (:class:`~ovseg_mine.mine.inflight.InFlightShards`)
and per-shard counters, never a record per image, and writes a shard as soon as all of its rows are back. A
shard's rows are sorted before writing, so the same input and config give the same shards whatever the number
of workers or the order in which batches finish.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from ovseg_mine import __version__
from ovseg_mine.config import MineConfig, config_hash, mining_config
from ovseg_mine.mine.failures import FailureWatch
from ovseg_mine.mine.graph import guarded, init_ray, stream_results
from ovseg_mine.mine.inflight import InFlightShards
from ovseg_mine.mine.manifest import build_manifest
from ovseg_mine.mine.proposal_sources import ProposalSource, build_proposal_source
from ovseg_mine.mine.run_folder import RUN_LOG, RunError, prepare_run_dir, run_log
from ovseg_mine.mine.sources import Reject, ShardTask, SourceError, SourcePlan, build_source
from ovseg_mine.mine.sources.read import first_records
from ovseg_mine.mine.weights import resolve_weights
from ovseg_mine.shards import read_done, remove_partial_writes, write_json_atomic, write_shard

__all__ = ["RunError", "mine"]

log = logging.getLogger("ovseg_mine")

_IMAGE_FIELDS = ("image_id", "status", "reason", "width", "height", "num_nouns", "num_proposals")


def _shard_outcome(task: ShardTask, results: list[dict[str, Any]]) -> tuple[list, dict]:
    """The pairs and the done record of one shard from its results (in shard order)."""
    pairs: list[dict[str, Any]] = []
    images, rejects, warned = [], [], []
    stage_s: Counter[str] = Counter()
    for result in results:
        pairs.extend(result["pairs"])
        notes = list(result["notes"] or [])
        images.append(
            {k: result[k] for k in _IMAGE_FIELDS}
            | {"num_pairs": len(result["pairs"]), "notes": notes}
            | ({"error_type": result["error_type"]} if result.get("error_type") else {})
        )
        if result["status"] != "ok":
            rejects.append(
                Reject(result["image_id"], result["file_name"], result["status"], result["reason"]).to_dict()
            )
        elif notes:
            warned.append(Reject(result["image_id"], result["file_name"], "warning", "; ".join(notes)).to_dict())
        for stage in ("decode", "nouns", "proposals", "crops", "clip"):
            stage_s[stage] += result[f"{stage}_s"] or 0.0
    pairs.sort(key=lambda p: (p["image_id"], p["caption_index"]))
    done = {
        "shard": task.index,
        "input": task.input,
        "image_ids": [r["image_id"] for r in results],
        "images": images,
        "rejects": rejects,
        "warnings": warned,
        "stage_s": dict(stage_s),
    }
    return pairs, done


def _write(out: Path, index: int, pairs: list[dict[str, Any]], done: dict, meta: dict, cfg: MineConfig) -> dict:
    import pyarrow as pa

    from ovseg_mine.shards import pair_schema

    table = pa.Table.from_pylist(pairs, schema=pair_schema())
    return write_shard(
        out, index, table, file_metadata=meta, done_record=done, row_group_size=cfg.shards.row_group_size
    )


def mine(
    cfg: MineConfig,
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    proposals: str | None = None,
    ray_address: str | None = None,
    overwrite: bool = False,
    on_progress: Callable[[int, int | None, int], None] | None = None,
) -> dict[str, Any]:
    """Mine mask-noun pairs from the source ``cfg.source.kind`` at ``source`` into ``out``; returns the manifest.

    Args:
        cfg: resolved config (``source.kind`` picks the source, ``proposals.kind`` the masks).
        source: the source's location (COCO: the captions JSON; see :mod:`ovseg_mine.mine.sources`).
        out: run folder (created; resumed when it holds the same config).
        images: COCO's image root (``--images``); None for the other kinds.
        proposals: location of the given masks when ``cfg.proposals.kind`` is ``coco`` or ``sa1b``.
        ray_address: join this Ray cluster; None starts a local Ray.
        overwrite: discard a run with another config in ``out``.
        on_progress: called as ``on_progress(images_done, images_total or None, pairs_done)`` after every image.

    Raises:
        ovseg_mine.mine.sources.SourceError, RunError, ovseg_mine.models.WeightsError, ConfigError.
    """
    out = Path(out)
    start = time.perf_counter()
    src = build_source(cfg, os.fspath(source), image_root=os.fspath(images) if images is not None else None)
    given = None
    if cfg.proposals.kind != "sam":
        if not proposals:
            raise SourceError(f"proposals.kind is {cfg.proposals.kind!r}: give their location, --proposals KIND:PATH")
        given = build_proposal_source(cfg.proposals.kind, proposals)
    elif proposals:
        raise SourceError("a proposals location was given but proposals.kind is 'sam'")
    plan = src.plan(cfg.shards.images_per_shard)
    prepare_run_dir(out, cfg, overwrite)
    with run_log(out / RUN_LOG):
        proposals_info: dict[str, Any] = {"kind": "sam"}
        if given is not None:
            proposals_info = given.prepare(str(out))
            if plan.tasks:
                given.check(*first_records(src, plan.tasks[0]))
        return _mine_into(out, cfg, src, plan, given, proposals_info, ray_address, on_progress, start)


def _mine_into(
    out: Path,
    cfg: MineConfig,
    source: Any,
    plan: SourcePlan,
    given: ProposalSource | None,
    proposals_info: dict[str, Any],
    ray_address: str | None,
    on_progress: Callable[[int, int | None, int], None] | None,
    start: float,
) -> dict[str, Any]:
    """:func:`mine` once the source is planned and the run folder prepared."""
    for name in remove_partial_writes(out):
        log.info("removed %s, left by an interrupted write", name)
    weights = resolve_weights(cfg)
    if weights.random:
        log.warning("this run uses randomly initialised weights: its pairs are meaningless (manifest: weights=random)")
    tasks = {task.index: task for task in plan.tasks}

    def matches(index: int, record: dict[str, Any]) -> bool:
        return index in tasks and record.get("input") == tasks[index].input

    done = {i: r for i, r in read_done(out).items() if matches(i, r)}
    todo = [task for task in plan.tasks if task.index not in done]
    meta = {
        "package_version": __version__,
        "config": mining_config(cfg),
        "config_hash": config_hash(cfg),
        "models": weights.models,
        "weights": "random" if weights.random else "pretrained",
        "source": {"kind": plan.info["kind"], "location": plan.info["location"]},
        "proposals": proposals_info,
    }
    total = plan.total
    images_done = sum(len(r["image_ids"]) for r in done.values())
    pairs_done = sum(r["rows"] for r in done.values())
    processed = 0
    inflight = InFlightShards(set(done))
    watch = FailureWatch(cfg.ray.max_consecutive_errors, str(out / RUN_LOG))
    started_ray = False
    try:
        if todo:
            started_ray = init_ray(ray_address)
            for result in guarded(stream_results(source, todo, cfg, weights, given)):
                if not inflight.add(result):  # a retried batch's rows come twice; a duplicate would end a shard early
                    continue
                watch.observe(result)
                processed += 1
                images_done += 1
                pairs_done += len(result["pairs"])
                index = result["shard"]
                results = inflight.pop_complete(index)
                if results is not None:
                    pairs, record = _shard_outcome(tasks[index], results)
                    done[index] = _write(out, index, pairs, record, meta, cfg)
                if on_progress:
                    on_progress(images_done, total, pairs_done)
            for task in todo:  # an input shard without a single sample yields no row: write it empty
                if not inflight.started(task.index):
                    pairs, record = _shard_outcome(task, [])
                    done[task.index] = _write(out, task.index, pairs, record, meta, cfg)
                    inflight.close(task.index)
            if inflight.unfinished():
                raise RunError(f"rows of some shards never came back ({inflight.unfinished()}); rerun to resume")
    finally:
        # A stop can land after a shard's done marker is written and before _write returns: trust the disk.
        unfinished = {task.index for task in todo} - done.keys()
        done.update({i: r for i, r in read_done(out, only=unfinished).items() if matches(i, r)})
        manifest = build_manifest(out, plan, cfg, weights, proposals_info, done, time.perf_counter() - start, processed)
        write_json_atomic(out / "manifest.json", manifest)
        if started_ray:
            import ray

            ray.shutdown()
    return manifest
