"""Mining as one Ray Data streaming pipeline: source -> nouns -> proposals + matching -> shards.

The driver reads the source, plans shards (image i of the id-sorted selection goes to shard
``i // images_per_shard``), skips shards already done, streams the rest through the Ray stages, and writes
a shard as soon as all of its images are back. Rows carry ids; Ray's output order does not matter: a shard's
rows are sorted before writing, so the same input and config give the same shards whatever the number of
workers or the order in which batches finish.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ovseg_mine import __version__
from ovseg_mine.config import MineConfig, config_hash, mining_config
from ovseg_mine.shards import (
    SCHEMA_VERSION,
    read_done,
    remove_partial_writes,
    sha256_file,
    write_json_atomic,
    write_shard,
)
from ovseg_mine.sources import ImageRecord, Reject, Source, read_coco_captions

if TYPE_CHECKING:
    from ovseg_mine.models import WeightsInfo

log = logging.getLogger("ovseg_mine")


class RunError(RuntimeError):
    """The run folder cannot be used as asked (e.g. it holds a run with another config)."""


@dataclass
class ResolvedWeights:
    """Weights chosen once by the driver and handed to every actor."""

    sam_checkpoint: str
    clip_pretrained: str
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    random: bool = False


def resolve_weights(cfg: MineConfig) -> ResolvedWeights:
    """Load both models once on CPU in the driver: downloads and checks weights, applies the recipe's
    random fallback, and records what was loaded. Actors then load exactly these weights (the cached file,
    or ``random`` with the run's seed), so no actor downloads or falls back on its own.

    Raises:
        ovseg_mine.models.WeightsError: weights unavailable and the recipe does not allow random weights.
    """
    import gc

    from ovseg_mine.models import load_clip, load_sam

    sam, sam_info = load_sam(
        cfg.sam.model_type, cfg.sam.checkpoint, device="cpu", seed=cfg.seed, allow_random=cfg.allow_random_weights
    )
    del sam
    clip, _, clip_info = load_clip(
        cfg.clip.arch, cfg.clip.pretrained, device="cpu", seed=cfg.seed, allow_random=cfg.allow_random_weights
    )
    del clip
    gc.collect()

    def actor_spec(info: "WeightsInfo", asked: str) -> str:
        if info.is_random:
            return "random"
        return info.source if info.weights == "file" and info.source else asked

    return ResolvedWeights(
        sam_checkpoint=actor_spec(sam_info, cfg.sam.checkpoint),
        clip_pretrained=actor_spec(clip_info, cfg.clip.pretrained),
        models={"sam": sam_info.to_dict(), "clip": clip_info.to_dict()},
        random=sam_info.is_random or clip_info.is_random,
    )


def prepare_run_dir(out: Path, cfg: MineConfig, overwrite: bool) -> None:
    """Create the run folder, or check that it holds a run of the same config.

    Raises:
        RunError: the folder holds a run with another config and ``overwrite`` is False.
    """
    cfg_path = out / "config.json"
    digest = config_hash(cfg)
    if cfg_path.is_file() and not overwrite:
        try:
            previous = json.loads(cfg_path.read_text(encoding="utf-8")).get("config_hash")
        except json.JSONDecodeError:
            previous = None
        if previous != digest:
            raise RunError(
                f"{out} holds a run with another config (config_hash {str(previous)[:12]} vs {digest[:12]}); "
                "use another --out, or --overwrite to discard it"
            )
    if overwrite:
        for name in ("shards", "manifest.json", "config.json"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cfg_path, {"config_hash": digest, "config": cfg.model_dump(mode="json")})


def plan_shards(records: list[ImageRecord], images_per_shard: int) -> dict[int, list[ImageRecord]]:
    """Shard index -> its records, in id order (records must already be sorted by image_id)."""
    plan: dict[int, list[ImageRecord]] = {}
    for position, record in enumerate(records):
        plan.setdefault(position // images_per_shard, []).append(record)
    return plan


def _init_ray(address: str | None) -> bool:
    """Start a local Ray or join ``address``; returns True when this call started it (and should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
                 configure_logging=True)
    except Exception as exc:  # Ray raises bare Exception on start-up timeouts, ConnectionError on bad addresses
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise RunError(f"could not start or join {where}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return True


def _guarded(results):
    """Pass ``results`` through, turning a Ray failure (workers that died more than their restarts allow, an
    actor whose constructor failed) into a :class:`RunError` that says the run can be resumed."""
    import ray

    try:
        yield from results
    except ray.exceptions.RayError as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise RunError(
            f"the Ray workers failed ({type(exc).__name__}: {first}); finished shards are kept: rerun the same "
            "command to resume"
        ) from exc


def _stream(records: list[ImageRecord], cfg: MineConfig, weights: ResolvedWeights):
    """Yield per-image result rows (dicts, see stages.image_result_schema) as Ray finishes them.

    Mask/match actors that die are restarted (``ray.max_actor_restarts``) and their batch retried; an image
    that keeps killing its worker is skipped after ``ray.max_image_attempts`` deaths (ovseg_mine.attempts).
    """
    import ray
    from ray.data import ActorPoolStrategy

    from ovseg_mine.attempts import AttemptTracker
    from ovseg_mine.stages import MaskMatchStage, NounStage

    tracker = ray.remote(num_cpus=0, max_restarts=-1)(AttemptTracker).remote()

    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    config = cfg.model_dump(mode="json")
    ds = ray.data.from_items([r.to_row() for r in records], override_num_blocks=max(1, min(len(records), 64)))
    ds = ds.map_batches(
        NounStage, fn_constructor_kwargs={"config": config}, batch_size=64, batch_format="pyarrow",
        compute=ActorPoolStrategy(size=cfg.ray.noun_actors), num_cpus=0.5,
    )
    if gpus:
        actors = cfg.ray.actors or max(1, int(gpus / cfg.ray.num_gpus_per_actor))
        resources: dict[str, Any] = {"num_gpus": cfg.ray.num_gpus_per_actor, "num_cpus": 1}
        threads = None
    else:
        actors = cfg.ray.actors or 1
        resources = {"num_cpus": 1}
        threads = max(1, (os.cpu_count() or cpus) // actors)
    with warnings.catch_warnings():  # actor restarts are only reachable through ray_remote_args (see pyproject)
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            MaskMatchStage,
            fn_constructor_kwargs={
                "config": config, "sam_checkpoint": weights.sam_checkpoint,
                "clip_pretrained": weights.clip_pretrained, "threads": threads, "tracker": tracker,
            },
            batch_size=cfg.ray.batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=actors),
            max_restarts=cfg.ray.max_actor_restarts, max_task_retries=-1, **resources,
        )
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        yield from batch.to_pylist()


def _shard_outcome(index: int, records: list[ImageRecord], results: list[dict[str, Any]]) -> tuple[list, dict]:
    by_id = {r["image_id"]: r for r in results}
    pairs: list[dict[str, Any]] = []
    images, rejects, warned = [], [], []
    stage_s: Counter[str] = Counter()
    for record in records:
        result = by_id[record.image_id]
        pairs.extend(result["pairs"])
        notes = list(record.notes) + list(result["notes"] or [])
        images.append({k: result[k] for k in ("image_id", "status", "reason", "width", "height", "num_nouns", "num_proposals")}
                      | {"num_pairs": len(result["pairs"]), "notes": notes})
        if result["status"] != "ok":
            rejects.append(Reject(record.image_id, record.file_name, result["status"], result["reason"]).to_dict())
        elif notes:
            warned.append(Reject(record.image_id, record.file_name, "warning", "; ".join(notes)).to_dict())
        for stage in ("decode", "nouns", "proposals", "crops", "clip"):
            stage_s[stage] += result[f"{stage}_s"] or 0.0
    done = {"shard": index, "image_ids": [r.image_id for r in records], "images": images, "rejects": rejects,
            "warnings": warned, "stage_s": dict(stage_s)}
    return pairs, done


def _write(out: Path, index: int, pairs: list[dict[str, Any]], done: dict, meta: dict, cfg: MineConfig) -> dict:
    import pyarrow as pa

    from ovseg_mine.shards import pair_schema

    table = pa.Table.from_pylist(pairs, schema=pair_schema())
    return write_shard(out, index, table, file_metadata=meta, done_record=done, row_group_size=cfg.shards.row_group_size)


def build_manifest(out: Path, source: Source, cfg: MineConfig, weights: ResolvedWeights, done: dict[int, dict],
                   plan: dict[int, list[ImageRecord]], wall_s: float, processed: int) -> dict[str, Any]:
    """The run manifest (schemas/manifest-v1.schema.json) from the done shards of ``plan``."""
    import pyarrow.parquet as pq

    shards, rejects, warned = [], [r.to_dict() for r in source.rejects], []
    images = with_pairs = proposals = pairs = 0
    nouns: set[str] = set()
    stage_s: Counter[str] = Counter()
    for index in sorted(plan):
        record = done.get(index)
        if record is None:
            continue
        shards.append({"file": record["file"], "rows": record["rows"], "sha256": record["sha256"], "images": len(record["image_ids"])})
        rejects.extend(record["rejects"])
        warned.extend(record.get("warnings", []))
        images += len(record["images"])
        with_pairs += sum(1 for image in record["images"] if image["num_pairs"])
        proposals += sum(image["num_proposals"] for image in record["images"])
        pairs += record["rows"]
        stage_s.update(record.get("stage_s", {}))
        if record["rows"]:
            nouns.update(pq.read_table(out / record["file"], columns=["noun"]).column("noun").to_pylist())
    complete = all(index in done for index in plan)
    return {
        "schema_version": SCHEMA_VERSION, "package_version": __version__, "status": "complete" if complete else "partial",
        "config": cfg.model_dump(mode="json"), "config_hash": config_hash(cfg), "models": weights.models,
        "weights": "random" if weights.random else "pretrained",
        "source": {"captions": source.captions_path, "captions_sha256": sha256_file(source.captions_path),
                   "image_root": source.image_root, "images_in_file": source.num_images_in_file,
                   "images_selected": len(source.records)},
        "shards": shards,
        "counts": {"images": images, "images_with_pairs": with_pairs, "images_rejected": len(rejects),
                   "pairs": pairs, "unique_nouns": len(nouns), "proposals": proposals,
                   "rejects_by_stage": dict(Counter(r["stage"] for r in rejects)),
                   "images_with_warnings": len(warned)},
        "rejects": rejects,
        "warnings": warned,
        "timings": {"wall_s": round(wall_s, 3), "images_per_s": round(processed / wall_s, 4) if wall_s > 0 else 0.0,
                    "images_this_invocation": processed, "stage_s": {k: round(v, 3) for k, v in stage_s.items()}},
    }


def mine(
    cfg: MineConfig,
    captions: str | os.PathLike[str],
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    ray_address: str | None = None,
    overwrite: bool = False,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> dict[str, Any]:
    """Mine mask-noun pairs from a COCO Captions dataset into ``out``; returns the manifest.

    Args:
        cfg: resolved config.
        captions, images: COCO captions JSON and image root.
        out: run folder (created; resumed when it holds the same config).
        ray_address: join this Ray cluster; None starts a local Ray.
        overwrite: discard a run with another config in ``out``.
        on_progress: called as ``on_progress(images_done, images_total, pairs_done)`` after every image.

    Raises:
        ovseg_mine.sources.SourceError, RunError, ovseg_mine.models.WeightsError, ConfigError.
    """
    out = Path(out)
    start = time.perf_counter()
    source = read_coco_captions(
        captions, images, captions_per_image=cfg.source.captions_per_image, limit=cfg.source.limit,
        image_ids=cfg.source.image_ids, max_caption_chars=cfg.nouns.max_caption_chars,
        skip_non_english=cfg.nouns.skip_non_english,
    )
    prepare_run_dir(out, cfg, overwrite)
    for name in remove_partial_writes(out):
        log.info("removed %s, left by an interrupted write", name)
    weights = resolve_weights(cfg)
    if weights.random:
        log.warning("this run uses randomly initialised weights: its pairs are meaningless (manifest: weights=random)")
    plan = plan_shards(source.records, cfg.shards.images_per_shard)
    done = {i: r for i, r in read_done(out).items() if i in plan and r.get("image_ids") == [x.image_id for x in plan[i]]}
    todo = [r for i in sorted(plan) if i not in done for r in plan[i]]
    shard_of = {r.image_id: i for i in plan for r in plan[i]}
    meta = {"package_version": __version__, "config": mining_config(cfg), "config_hash": config_hash(cfg),
            "models": weights.models, "weights": "random" if weights.random else "pretrained"}
    total = len(source.records)
    images_done = sum(len(plan[i]) for i in done)
    pairs_done = sum(r["rows"] for r in done.values())
    processed = 0
    pending: dict[int, list[dict[str, Any]]] = {}
    seen: set[int] = set()
    started_ray = False
    try:
        if todo:
            started_ray = _init_ray(ray_address)
            for result in _guarded(_stream(todo, cfg, weights)):
                if result["image_id"] in seen:  # Ray yields a retried batch once; a duplicate would end a shard early
                    continue
                seen.add(result["image_id"])
                index = shard_of[result["image_id"]]
                pending.setdefault(index, []).append(result)
                processed += 1
                images_done += 1
                pairs_done += len(result["pairs"])
                if len(pending[index]) == len(plan[index]):
                    pairs, record = _shard_outcome(index, plan[index], pending.pop(index))
                    pairs.sort(key=lambda p: (p["image_id"], p["caption_index"]))
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
        write_json_atomic(out / "manifest.json", manifest)
        if started_ray:
            import ray

            ray.shutdown()
    return manifest
