"""The streaming graph of a mining run's stages on Ray (read step :mod:`~ovseg_mine.mine.sources.read` ->
:class:`~ovseg_mine.mine.stages.NounStage` -> :class:`~ovseg_mine.mine.stages.MaskMatchStage`). Ray is started or
joined by :mod:`ovseg_mine.ray_session`."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

from ovseg_mine.config import MineConfig
from ovseg_mine.mine.run_folder import RunError
from ovseg_mine.mine.sources import ShardTask, Source
from ovseg_mine.mine.weights import ResolvedWeights
from ovseg_mine.storage import first_line

if TYPE_CHECKING:
    from ovseg_mine.mine.proposal_sources import ProposalSource


def guarded(results):
    """Pass ``results`` through, turning a Ray failure (workers that died more than their restarts allow, an
    actor whose constructor failed) into a :class:`RunError` that says the run can be resumed."""
    import ray

    try:
        yield from results
    except ray.exceptions.RayError as exc:
        # Ray's message starts with where it failed and ends with the error that failed it (an actor constructor's
        # WeightsError for a checkpoint of the wrong model, ...): say both, on one line.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = first_line(exc)
        cause = f"; {lines[-1][:300]}" if len(lines) > 1 and lines[-1] != first else ""
        raise RunError(
            f"the Ray workers failed ({type(exc).__name__}: {first}{cause}); finished shards are kept: rerun the "
            "same command to resume"
        ) from exc


def stream_results(
    source: Source,
    tasks: list[ShardTask],
    cfg: MineConfig,
    weights: ResolvedWeights,
    given: "ProposalSource | None" = None,
):
    """Yield per-image result rows (dicts, see stages.image_result_schema) as Ray finishes them: one per record
    of ``tasks`` (read by ``source``'s read step, with ``given`` masks attached when the run has them), each
    carrying its ``shard``, ``shard_size`` and ``shard_row``.

    Mask/match actors that die are restarted (``ray.max_actor_restarts``) and their batch retried; an image
    that keeps killing its worker is skipped after ``ray.max_image_attempts`` deaths (ovseg_mine.mine.attempts).
    """
    import ray
    from ray.data import ActorPoolStrategy

    from ovseg_mine.mine.attempts import AttemptTracker
    from ovseg_mine.mine.sources.read import records_dataset
    from ovseg_mine.mine.stages import MaskMatchStage, NounStage

    tracker = ray.remote(num_cpus=0, max_restarts=-1)(AttemptTracker).remote()

    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    config = cfg.model_dump(mode="json")
    ds = records_dataset(source, tasks, given)
    ds = ds.map_batches(
        NounStage,
        fn_constructor_kwargs={"config": config},
        batch_size=64,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=cfg.ray.noun_actors),
        num_cpus=0.5,
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
                "config": config,
                "sam_checkpoint": weights.sam_checkpoint,
                "clip_pretrained": weights.clip_pretrained,
                "threads": threads,
                "tracker": tracker,
            },
            batch_size=cfg.ray.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=actors),
            max_restarts=cfg.ray.max_actor_restarts,
            max_task_retries=-1,
            **resources,
        )
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        yield from batch.to_pylist()
