"""Mining as one Ray Data streaming pipeline: source -> nouns -> proposals + matching -> shards.

The driver reads the source, plans shards (image i of the id-sorted selection goes to shard
``i // images_per_shard``), skips shards already done, streams the rest through the Ray stages, and writes
a shard as soon as all of its images are back. Rows carry ids; Ray's output order does not matter: a shard's
rows are sorted before writing, so the same input and config give the same shards whatever the number of
workers or the order in which batches finish.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import Counter
from typing import Any, Callable, NamedTuple

from ovseg_mine import __version__
from ovseg_mine.config import MineConfig, config_hash, mining_config
from ovseg_mine.mine.failures import FailureWatch
from ovseg_mine.mine.graph import guarded, stream_results
from ovseg_mine.mine.manifest import build_manifest
from ovseg_mine.mine.retry import failed_images, kept_results, merged_stage_s
from ovseg_mine.mine.run_folder import RUN_LOG, RunError, plan_shards, prepare_run_dir, run_log
from ovseg_mine.mine.run_lock import hold_run
from ovseg_mine.mine.sources import ImageRecord, Reject, Source, read_coco_captions
from ovseg_mine.mine.weights import resolve_weights
from ovseg_mine.ray_session import cluster_address, init_ray, probe_cluster, shutdown_ray
from ovseg_mine.shards import read_done, remove_partial_writes, write_json_atomic, write_shard
from ovseg_mine.storage import Location, StorageError, resolve

__all__ = ["RunError", "mine"]

log = logging.getLogger("ovseg_mine")


def _shard_outcome(index: int, records: list[ImageRecord], results: list[dict[str, Any]]) -> tuple[list, dict]:
    by_id = {r["image_id"]: r for r in results}
    pairs: list[dict[str, Any]] = []
    images, rejects, warned = [], [], []
    stage_s: Counter[str] = Counter()
    for record in records:
        result = by_id[record.image_id]
        pairs.extend(result["pairs"])
        notes = list(record.notes) + list(result["notes"] or [])
        images.append(
            {k: result[k] for k in ("image_id", "status", "reason", "width", "height", "num_nouns", "num_proposals")}
            | {"num_pairs": len(result["pairs"]), "notes": notes}
            | ({"error_type": result["error_type"]} if result.get("error_type") else {})
        )
        if result["status"] != "ok":
            rejects.append(Reject(record.image_id, record.file_name, result["status"], result["reason"]).to_dict())
        elif notes:
            warned.append(Reject(record.image_id, record.file_name, "warning", "; ".join(notes)).to_dict())
        for stage in ("decode", "nouns", "proposals", "crops", "clip"):
            stage_s[stage] += result[f"{stage}_s"] or 0.0
    done = {
        "shard": index,
        "image_ids": [r.image_id for r in records],
        "images": images,
        "rejects": rejects,
        "warnings": warned,
        "stage_s": dict(stage_s),
    }
    return pairs, done


def _write(out: Location, index: int, pairs: list[dict[str, Any]], done: dict, meta: dict, cfg: MineConfig) -> dict:
    import pyarrow as pa

    from ovseg_mine.shards import pair_schema

    table = pa.Table.from_pylist(pairs, schema=pair_schema())
    return write_shard(
        out, index, table, file_metadata=meta, done_record=done, row_group_size=cfg.shards.row_group_size
    )


def mine(
    cfg: MineConfig,
    captions: str | os.PathLike[str],
    images: str | os.PathLike[str],
    out: str | os.PathLike[str] | Location,
    *,
    ray_address: str | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    verbose: bool = False,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> dict[str, Any]:
    """Mine mask-noun pairs from a COCO Captions dataset into ``out``; returns the manifest.

    Args:
        cfg: resolved config.
        captions, images: COCO captions JSON and image root.
        out: run folder, a local path or a URI (``s3://``, ``gs://``...): created; resumed when it holds the same
            config. One run at a time: the folder is held while the run works (ovseg_mine.mine.run_lock).
        ray_address: join this Ray cluster; None: ``RAY_ADDRESS``, else a new local Ray (ovseg_mine.mine.graph).
        overwrite: discard a run with another config in ``out``.
        retry_failed: also mine again the images of finished shards that failed (stage ``error``), and rewrite
            only their shards (ovseg_mine.mine.retry); other rejects stay as they are.
        verbose: Ray's own log lines on the console too (else only in ``RUN/mine.log``).
        on_progress: called as ``on_progress(images_done, images_total, pairs_done)`` after every image.

    Raises:
        ovseg_mine.mine.sources.SourceError, RunError (also ovseg_mine.mine.run_lock.RunInUse: the folder is held
        by another run), ovseg_mine.ray_session.RayStartError (no Ray to join or start), ovseg_mine.models.WeightsError,
        ConfigError.
    """
    try:
        out = resolve(out)
    except StorageError as exc:
        raise RunError(str(exc)) from exc
    if cluster_address(ray_address) is not None:  # before any work: a cluster that answers nothing fails at once
        probe_cluster(cluster_address(ray_address))
    start = time.perf_counter()
    source = read_coco_captions(
        captions,
        images,
        captions_per_image=cfg.source.captions_per_image,
        limit=cfg.source.limit,
        image_ids=cfg.source.image_ids,
        max_caption_chars=cfg.nouns.max_caption_chars,
        skip_non_english=cfg.nouns.skip_non_english,
    )
    try:
        with hold_run(out):
            prepare_run_dir(out, cfg, overwrite)
            with run_log(out) as log_handler:
                start_ray = functools.partial(init_ray, ray_address, verbose=verbose, log_handler=log_handler)
                return _mine_into(out, cfg, source, start_ray, retry_failed, on_progress, start)
    except StorageError as exc:
        raise RunError(str(exc)) from exc


class _Retry(NamedTuple):
    """A finished shard being mined again: its failed image ids and its done record as it was."""

    failed: set[int]
    record: dict[str, Any]


def _take_failed(
    out: Location, plan: dict[int, list[ImageRecord]], done: dict[int, dict], pending: dict[int, list[dict]]
) -> dict[int, _Retry]:
    """For ``--retry-failed``: move each done shard with failed images from ``done`` to ``pending``, pre-filled with
    the results of its other images; returns the failed ids per shard (ovseg_mine.mine.retry)."""
    retried: dict[int, _Retry] = {}
    for index, record in sorted(done.items()):
        failed = failed_images(record)
        if not failed:
            continue
        kept = kept_results(out, record, failed)
        source_notes = {r.image_id: len(r.notes) for r in plan[index]}
        for result in kept:  # the source's notes are added again when the shard is rebuilt
            result["notes"] = result["notes"][source_notes[result["image_id"]] :]
        pending[index] = kept
        retried[index] = _Retry(failed, done.pop(index))
        log.info("shard %d: mining again its %d failed image(s)", index, len(failed))
    return retried


def _mine_into(
    out: Location,
    cfg: MineConfig,
    source: Source,
    start_ray: Callable[[], bool],
    retry_failed: bool,
    on_progress: Callable[[int, int, int], None] | None,
    start: float,
) -> dict[str, Any]:
    """:func:`mine` once the source is read and the run folder prepared."""
    for name in remove_partial_writes(out):
        log.info("removed %s, left by an interrupted write", name)
    weights = resolve_weights(cfg)
    if weights.random:
        log.warning("this run uses randomly initialised weights: its pairs are meaningless (manifest: weights=random)")
    plan = plan_shards(source.records, cfg.shards.images_per_shard)
    done = {
        i: r for i, r in read_done(out).items() if i in plan and r.get("image_ids") == [x.image_id for x in plan[i]]
    }
    pending: dict[int, list[dict[str, Any]]] = {}
    retried = _take_failed(out, plan, done, pending) if retry_failed else {}
    todo = [
        r for i in sorted(plan) if i not in done for r in plan[i] if i not in retried or r.image_id in retried[i].failed
    ]
    shard_of = {r.image_id: i for i in plan for r in plan[i]}
    meta = {
        "package_version": __version__,
        "config": mining_config(cfg),
        "config_hash": config_hash(cfg),
        "models": weights.models,
        "weights": "random" if weights.random else "pretrained",
    }
    total = len(source.records)
    images_done = sum(len(plan[i]) for i in done) + sum(len(kept) for kept in pending.values())
    pairs_done = sum(r["rows"] for r in done.values()) + sum(len(r["pairs"]) for k in pending.values() for r in k)
    processed = 0
    seen: set[int] = set()
    watch = FailureWatch(cfg.ray.max_consecutive_errors, out.join(RUN_LOG).uri)
    started_ray = False
    try:
        if todo:
            started_ray = start_ray()
            for result in guarded(stream_results(todo, cfg, weights)):
                if result["image_id"] in seen:  # Ray yields a retried batch once; a duplicate would end a shard early
                    continue
                seen.add(result["image_id"])
                watch.observe(result)
                index = shard_of[result["image_id"]]
                pending.setdefault(index, []).append(result)
                processed += 1
                images_done += 1
                pairs_done += len(result["pairs"])
                if len(pending[index]) == len(plan[index]):
                    pairs, record = _shard_outcome(index, plan[index], pending.pop(index))
                    pairs.sort(key=lambda p: (p["image_id"], p["caption_index"]))
                    if index in retried:
                        record["stage_s"] = merged_stage_s(retried[index].record, record)
                    done[index] = _write(out, index, pairs, record, meta, cfg)
                if on_progress:
                    on_progress(images_done, total, pairs_done)
    finally:
        # A stop can land after a shard's done marker is written and before _write returns: trust the disk.
        unfinished = {shard_of[r.image_id] for r in todo} - done.keys()
        for index, record in read_done(out, only=unfinished).items():
            if record.get("image_ids") == [x.image_id for x in plan[index]]:
                done[index] = record
        manifest = build_manifest(out, source, cfg, weights, done, plan, time.perf_counter() - start, processed)
        write_json_atomic(out.join("manifest.json"), manifest)
        if started_ray:
            shutdown_ray()
    return manifest
