"""Mining as one Ray Data streaming pipeline: read step -> nouns -> proposals + matching -> shards.

The driver plans the source's shards (:meth:`~ovseg_mine.mine.sources.base.Source.plan`: light tasks, one per
output shard), skips shards already done with the same input, and streams the rest through the Ray stages: the
read step produces the records inside Ray, each stamped with its shard, the shard's size and its position in
it. The driver holds only the results of shards in flight (:class:`~ovseg_mine.mine.run.inflight.InFlightShards`)
and per-shard counters, never a record per image, and writes a shard as soon as all of its rows are back. A
shard's rows are sorted before writing, so the same input and config give the same shards whatever the number
of workers or the order in which batches finish.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, replace
from typing import Any, Callable, NamedTuple

from ovseg_mine import __version__
from ovseg_mine.config import MineConfig, config_hash, mining_config
from ovseg_mine.done_record import DoneRecord, Reject
from ovseg_mine.faults import failpoint
from ovseg_mine.mine.errors import RunError
from ovseg_mine.mine.graph.dataset import guarded, stream_results
from ovseg_mine.mine.graph.rows import TIMED_STEPS, ImageResult
from ovseg_mine.mine.graph.weights import ResolvedWeights, resolve_weights
from ovseg_mine.mine.run.failures import FailureWatch
from ovseg_mine.mine.run.inflight import InFlightShards
from ovseg_mine.mine.run.manifest import build_manifest
from ovseg_mine.mine.run.node_watch import alive_nodes, watched
from ovseg_mine.mine.run.retry import failed_images, kept_results, merged_stage_s
from ovseg_mine.mine.run.run_folder import RUN_LOG, prepare_run_dir, run_log
from ovseg_mine.mine.run.run_lock import hold_run
from ovseg_mine.mine.sources import MineInput, ShardTask, SourcePlan, build_source
from ovseg_mine.mine.sources.proposal_files import ProposalSource
from ovseg_mine.mine.sources.read import first_records
from ovseg_mine.ray_session import cluster_address, init_ray, probe_cluster, shutdown_ray
from ovseg_mine.shards import move_legacy_markers, read_done, remove_partial_writes, write_json_atomic, write_shard
from ovseg_mine.stop_signals import critical
from ovseg_mine.storage import Location, StorageError, resolve

__all__ = ["RunError", "mine"]

log = logging.getLogger("ovseg_mine")


def _shard_outcome(task: ShardTask, results: list[ImageResult]) -> tuple[list, DoneRecord]:
    """The pairs and the done record of one shard from its results (in shard order)."""
    pairs: list[dict[str, Any]] = []
    images, rejects, warned = [], [], []
    stage_s: Counter[str] = Counter()
    for result in results:
        if result.image_id is None:  # a reject about an input file (records.file_reject_row), not an image
            rejects.append(Reject(None, result.file_name, result.status, result.reason))
            continue
        pairs.extend(result.pairs)
        image = result.image_status()
        images.append(image)
        if result.status != "ok":
            rejects.append(Reject(result.image_id, result.file_name, result.status, result.reason))
        elif image.notes:
            warned.append(Reject(result.image_id, result.file_name, "warning", "; ".join(image.notes)))
        for step in TIMED_STEPS:
            stage_s[step] += getattr(result, f"{step}_s") or 0.0
    pairs.sort(key=lambda p: (p["image_id"], p["caption_index"]))
    done = DoneRecord(
        shard=task.index,
        input=task.input,
        image_ids=tuple(r.image_id for r in results if r.image_id is not None),
        images=tuple(images),
        rejects=tuple(rejects),
        warnings=tuple(warned),
        stage_s=dict(stage_s),
    )
    return pairs, done


def _write(
    out: Location, index: int, pairs: list[dict[str, Any]], done: DoneRecord, meta: dict, cfg: MineConfig
) -> DoneRecord:
    import pyarrow as pa

    from ovseg_mine.shards import pair_schema

    table = pa.Table.from_pylist(pairs, schema=pair_schema())
    with critical():  # a stop signal waits for the commit (shard, then its done marker) to end
        return write_shard(
            out, index, table, file_metadata=meta, done_record=done, row_group_size=cfg.shards.row_group_size
        )


def mine(
    cfg: MineConfig,
    what: MineInput,
    out: str | os.PathLike[str] | Location,
    *,
    ray_address: str | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    verbose: bool = False,
    on_progress: Callable[[int, int | None, int], None] | None = None,
) -> dict[str, Any]:
    """Mine mask-noun pairs from the source ``what`` names into ``out``; returns the manifest.

    Args:
        cfg: resolved config; its ``source.kind`` and ``proposals.kind`` are set from ``what``
            (:meth:`~ovseg_mine.mine.sources.mine_input.MineInput.configure`) before the run folder records it.
        what: the checked input: the source's kind and location (a path or a URI: ``s3://``, ``gs://``...),
            COCO's image root, and where the masks come from (:class:`~ovseg_mine.mine.sources.MineInput`).
        out: run folder, a local path or a URI: created; resumed when it holds the same config. One run at a
            time: the folder is held while the run works (ovseg_mine.mine.run.run_lock).
        ray_address: join this Ray cluster; None: ``RAY_ADDRESS``, else a new local Ray (ovseg_mine.ray_session).
        overwrite: discard a run with another config in ``out``.
        retry_failed: also mine again the images of finished shards that failed (stage ``error``), and rewrite
            only their shards (ovseg_mine.mine.run.retry); other rejects stay as they are.
        verbose: Ray's own log lines on the console too (else only in ``RUN/mine.log``).
        on_progress: called as ``on_progress(images_done, images_total or None, pairs_done)`` after every image.

    Raises:
        ovseg_mine.mine.sources.SourceError, RunError (also ovseg_mine.mine.run.run_lock.RunInUse: the folder is held
        by another run), ovseg_mine.ray_session.RayStartError (no Ray to join or start),
        ovseg_mine.weights_info.WeightsError, ConfigError.
    """
    try:
        out = resolve(out)
    except StorageError as exc:
        raise RunError(str(exc)) from exc
    if cluster_address(ray_address) is not None:  # before any work: a cluster that answers nothing fails at once
        probe_cluster(cluster_address(ray_address))
    start = time.perf_counter()
    cfg = what.configure(cfg)
    src = build_source(cfg, what)
    given = what.proposal_source()
    plan = src.plan(cfg.shards.images_per_shard)
    weights = resolve_weights(cfg)
    try:
        with hold_run(out):
            with critical():  # a stop signal here waits: a run folder is never left without its manifest
                prepare_run_dir(out, cfg, overwrite)
                if not out.join("manifest.json").is_file():
                    done = _planned_done(out, plan, verify=False)
                    info = {"kind": cfg.proposals.kind}
                    manifest = build_manifest(out, plan, cfg, weights, info, done, time.perf_counter() - start, 0)
                    write_json_atomic(out.join("manifest.json"), manifest)
            with run_log(out) as log_handler:
                proposals_info: dict[str, Any] = {"kind": "sam"}
                if given is not None:
                    proposals_info = given.prepare(out.uri)
                    if plan.tasks:
                        given.check(*first_records(src, plan.tasks[0]))
                start_ray = functools.partial(init_ray, ray_address, verbose=verbose, log_handler=log_handler)
                run = _Run(src, plan, given, proposals_info, weights)
                return _mine_into(out, cfg, run, start_ray, retry_failed, on_progress, start)
    except StorageError as exc:
        raise RunError(str(exc)) from exc


class _Run(NamedTuple):
    """What a run mines: the planned source, the given masks when it has them, the weights resolved for it."""

    source: Any
    plan: SourcePlan
    given: ProposalSource | None
    proposals_info: dict[str, Any]
    weights: ResolvedWeights


def _planned_done(
    out: Location, plan: SourcePlan, *, verify: bool = True, only: set[int] | None = None
) -> dict[int, DoneRecord]:
    """The done records on disk that belong to this run's plan (same shard index, same input), by shard index."""
    tasks = {task.index: task for task in plan.tasks}
    records = read_done(out, verify=verify, only=only)
    return {i: r for i, r in records.items() if i in tasks and r.input == tasks[i].input}


class _Retry(NamedTuple):
    """A finished shard being mined again: its failed image ids and its done record as it was."""

    failed: set[int]
    record: DoneRecord


def _take_failed(out: Location, done: dict[int, DoneRecord], inflight: InFlightShards) -> dict[int, _Retry]:
    """For ``--retry-failed``: move each done shard with failed images out of ``done`` and into ``inflight``,
    pre-filled with the results of its other images at their positions; returns the failed ids per shard
    (ovseg_mine.mine.run.retry)."""
    retried: dict[int, _Retry] = {}
    for index, record in sorted(done.items()):
        failed = failed_images(record)
        if not failed:
            continue
        size = len(record.images)
        rows = {image.image_id: row for row, image in enumerate(record.images)}
        inflight.reopen(index, size)
        for result in kept_results(out, record, failed):
            inflight.add(replace(result, shard=index, shard_size=size, shard_row=rows[result.image_id]))
        retried[index] = _Retry(failed, done.pop(index))
        log.info("shard %d: mining again its %d failed image(s)", index, len(failed))
    return retried


@dataclass
class _Commits:
    """The driver's state while results stream in: done records by shard, the shards in flight, the counters; each
    shard is committed as its last row arrives."""

    out: Location
    cfg: MineConfig
    tasks: dict[int, ShardTask]
    retried: dict[int, _Retry]
    meta: dict[str, Any]
    total: int | None
    watch: FailureWatch
    on_progress: Callable[[int, int | None, int], None] | None
    done: dict[int, DoneRecord]
    inflight: InFlightShards
    images_done: int = 0
    pairs_done: int = 0
    processed: int = 0

    def take(self, result: ImageResult) -> None:
        """Keep one image's result; commit its shard when it was the shard's last row."""
        if not self.inflight.add(result):  # a retried batch's rows come twice; a duplicate would end a shard early
            return
        self.watch.observe(result)
        if result.image_id is not None:  # not a reject about an input file (records.file_reject_row)
            self.processed += 1
            self.images_done += 1
        self.pairs_done += len(result.pairs)
        index = result.shard
        results = self.inflight.pop_complete(index)
        if results is not None:
            pairs, record = _shard_outcome(self.tasks[index], results)
            if index in self.retried:
                record = replace(record, stage_s=merged_stage_s(self.retried[index].record, record))
            self.done[index] = _write(self.out, index, pairs, record, self.meta, self.cfg)
            failpoint("run.after_commit", index)
        if self.on_progress:
            self.on_progress(self.images_done, self.total, self.pairs_done)


def _stream(
    run: _Run, weights: ResolvedWeights, todo: list[ShardTask], commits: _Commits, start_ray: Callable[[], bool]
) -> None:
    """Mine ``todo`` through the Ray graph (ovseg_mine.mine.graph.dataset), committing shards as they complete.

    When a node of the cluster is lost and the graph cannot go on (Ray Data aborts on a task of an actor that died
    with it, or nothing comes back for ``ray.stall_timeout_s``: ovseg_mine.mine.run.node_watch.NodeLostError), the
    driver leaves the cluster (Ray then ends the job's actors and tasks, the lost node's pending restarts with
    them), joins it again (``start_ray``) and starts the graph for the shards not done yet, sized for the nodes left
    (the mask/match pool starts with the actors they hold), up to ``ray.max_graph_restarts`` times; rows already
    received are kept and their repeats ignored. A failure with no new node lost since the last start ends the run
    (resumable). Shutting the graph down alone is not enough: the lost actor's restart stays pending in the job and
    the new pool waits behind it.
    """
    cfg = commits.cfg
    at_start = alive_nodes()
    handled: set[str] = set()
    restarts = 0
    while True:
        remaining = [task for task in todo if task.index not in commits.done]
        results = stream_results(run.source, remaining, cfg, weights, run.given)
        try:
            with closing(results):  # however the loop ends, Ray Data's execution ends with it
                for result in guarded(watched(results, stall_s=cfg.ray.stall_timeout_s, at_start=at_start)):
                    commits.take(result)
            return
        except RunError:  # Ray Data gave up on a task of a lost node, or nothing came back (NodeLostError)
            lost = set(at_start) - set(alive_nodes()) - handled
            if not lost or restarts >= cfg.ray.max_graph_restarts:
                raise
            restarts += 1
            handled |= lost
            shutdown_ray()
            start_ray()
            log.warning(
                "lost %d Ray node(s) (%s); mining the %d unfinished shard(s) again on the nodes left (restart %d of "
                "at most %d)",
                len(lost),
                ", ".join(sorted(at_start[node] for node in lost)),
                sum(1 for task in todo if task.index not in commits.done),
                restarts,
                cfg.ray.max_graph_restarts,
            )


def _mine_into(
    out: Location,
    cfg: MineConfig,
    run: _Run,
    start_ray: Callable[[], bool],
    retry_failed: bool,
    on_progress: Callable[[int, int | None, int], None] | None,
    start: float,
) -> dict[str, Any]:
    """:func:`mine` once the source is planned and the run folder prepared."""
    for name in remove_partial_writes(out):
        log.info("removed %s, left by an interrupted write", name)
    for name in move_legacy_markers(out):
        log.info("moved the done marker shards/%s to done/ (the layout of earlier runs)", name)
    weights = run.weights
    if weights.random:
        log.warning("this run uses randomly initialised weights: its pairs are meaningless (manifest: weights=random)")
    plan = run.plan
    tasks = {task.index: task for task in plan.tasks}
    done = _planned_done(out, plan)
    inflight = InFlightShards(set(done))
    retried = _take_failed(out, done, inflight) if retry_failed else {}
    todo = [task for task in plan.tasks if task.index not in done and task.index not in retried]
    todo += [replace(tasks[i], payload={**tasks[i].payload, "only_ids": sorted(r.failed)}) for i, r in retried.items()]
    todo.sort(key=lambda task: task.index)
    meta = {
        "package_version": __version__,
        "config": mining_config(cfg),
        "config_hash": config_hash(cfg),
        "models": weights.models,
        "weights": "random" if weights.random else "pretrained",
        "source": {"kind": plan.info["kind"], "location": plan.info["location"]},
        "proposals": run.proposals_info,
    }
    commits = _Commits(
        out,
        cfg,
        tasks,
        retried,
        meta,
        plan.total,
        FailureWatch(cfg.ray.max_consecutive_errors, out.join(RUN_LOG).uri),
        on_progress,
        done,
        inflight,
        images_done=sum(len(r.image_ids) for r in done.values()) + len(inflight),
        pairs_done=sum(r.rows for r in done.values()) + sum(r.record.rows for r in retried.values()),
    )
    started_ray = False
    try:
        if todo:
            started_ray = start_ray()
            _stream(run, weights, todo, commits, start_ray)
            for task in todo:  # an input shard without a single sample yields no row: write it empty
                if not inflight.started(task.index):
                    pairs, record = _shard_outcome(task, [])
                    done[task.index] = _write(out, task.index, pairs, record, meta, cfg)
                    inflight.close(task.index)
            if inflight.unfinished():
                raise RunError(f"rows of some shards never came back ({inflight.unfinished()}); rerun to resume")
    finally:
        # A stop signal waits until the manifest is written and Ray is shut down (ovseg_mine.stop_signals).
        with critical():
            try:
                # A stop can land after a shard's done marker is written and before _write returns: trust the disk.
                unfinished = {task.index for task in todo} - done.keys()
                done.update(_planned_done(out, plan, only=unfinished))
                wall_s = time.perf_counter() - start
                processed = commits.processed
                manifest = build_manifest(out, plan, cfg, weights, run.proposals_info, done, wall_s, processed)
                failpoint("manifest.before_write", "run")
                write_json_atomic(out.join("manifest.json"), manifest)
            finally:
                if started_ray:
                    shutdown_ray()
    return manifest
