"""The streaming graph of a mining run's stages on Ray, laid out by resource (read step
:mod:`~ovseg_mine.mine.sources.read` -> :class:`~ovseg_mine.mine.graph.stages.NounStage` ->
:func:`~ovseg_mine.mine.graph.stages.decode_stage` -> :class:`~ovseg_mine.mine.graph.stages.MaskMatchStage` ->
:func:`~ovseg_mine.mine.graph.stages.finalize_stage`). Ray is started or joined by :mod:`ovseg_mine.ray_session`."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ovseg_mine.config import MineConfig
from ovseg_mine.mine.errors import RunError
from ovseg_mine.mine.graph.rows import ImageResult
from ovseg_mine.mine.graph.weights import ResolvedWeights
from ovseg_mine.mine.sources import ShardTask, Source
from ovseg_mine.storage import first_line

if TYPE_CHECKING:
    from ray.data import Dataset

    from ovseg_mine.mine.sources.proposal_files import ProposalSource


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


#: CPUs a spaCy (noun) actor reserves.
NOUN_ACTOR_CPUS = 0.5


@dataclass(frozen=True)
class StagePlan:
    """How many workers each stage gets and what they hold, from the cluster's resources and the config.

    Attributes:
        noun_actors: spaCy actors (one per 32 GPUs by default: an actor parses ~1,100 captions/s, a GPU mines
            ~20 images/s).
        gpu_actors: mask/match actors at most (one per ``ray.num_gpus_per_actor`` GPUs, 1 without GPUs, or
            ``ray.actors``); the pool goes on with as few as one.
        gpu_actors_at_start: the actors the pool starts with: those the cluster holds now, once the noun actors and
            a decode and a finalize task have their CPUs (at least 1, at most ``gpu_actors``). An actor asked for
            where nothing can hold it would stay pending and, on a small cluster, starve the other stages; a node
            lost and the graph started again gets the pool that the nodes left hold.
        gpu_actor_resources: Ray resources of a mask/match actor.
        threads: torch CPU threads of a mask/match actor without GPUs (None: torch's default).
        cpu_task_cpus: CPUs reserved by a decode or finalize task (Ray Data runs as many as the free CPUs allow).
    """

    noun_actors: int
    gpu_actors: int
    gpu_actors_at_start: int
    gpu_actor_resources: dict[str, float]
    threads: int | None
    cpu_task_cpus: float


def plan_stages(cfg: MineConfig, cpus: int, gpus: int) -> StagePlan:
    """The :class:`StagePlan` for a cluster with ``cpus`` CPUs and ``gpus`` GPUs (Ray's cluster resources)."""
    nouns = cfg.ray.noun_actors or max(1, -(-gpus // 32))
    task_cpus = 0.5 if cpus >= 4 else 0.25
    cpu_room = int(cpus - nouns * NOUN_ACTOR_CPUS - 2 * task_cpus)  # a mask/match actor reserves 1 CPU
    if gpus:
        fit = min(int(gpus / cfg.ray.num_gpus_per_actor), cpu_room)
        actors = cfg.ray.actors or max(1, int(gpus / cfg.ray.num_gpus_per_actor))
        resources = {"num_gpus": cfg.ray.num_gpus_per_actor, "num_cpus": 1.0}
    else:
        fit = cpu_room
        actors = cfg.ray.actors or 1
        resources = {"num_cpus": 1.0}
    start = max(1, min(actors, fit))
    threads = None if gpus else max(1, cpus // start)
    return StagePlan(nouns, actors, start, resources, threads, task_cpus)


def stream_results(
    source: Source,
    tasks: list[ShardTask],
    cfg: MineConfig,
    weights: ResolvedWeights,
    given: "ProposalSource | None" = None,
) -> Iterator[ImageResult]:
    """Yield per-image results (:class:`~ovseg_mine.mine.graph.rows.ImageResult`) as Ray finishes them: one per
    record of ``tasks`` (read by ``source``'s read step, with ``given`` masks attached when the run has them), each
    carrying its ``shard``, ``shard_size`` and ``shard_row``.

    The graph, by resource: nouns (spaCy actors) -> decode (CPU tasks: JPEG, SAM's resize) -> mask/match (an
    actor per GPU over batches of images, ``ray.batches_in_flight`` batches queued each) -> finalize (CPU tasks:
    RLE of the matched masks, pair rows). Mask/match actors that die are restarted (``ray.max_actor_restarts``)
    and their batch retried; an image that keeps killing its worker is skipped after ``ray.max_image_attempts``
    deaths (ovseg_mine.mine.graph.attempts).
    """
    import ray

    from ovseg_mine.mine.graph.attempts import AttemptTracker
    from ovseg_mine.mine.graph.stages import finalize_stage
    from ovseg_mine.mine.sources.read import records_dataset

    tracker = ray.remote(num_cpus=0, max_restarts=-1)(AttemptTracker).remote()
    resources = ray.cluster_resources()
    plan = plan_stages(cfg, int(resources.get("CPU", 1)), int(resources.get("GPU", 0)))
    ds = records_dataset(source, tasks, given)
    ds = _decoded(ds, cfg, plan)
    ds = _matched(ds, cfg, weights, plan, tracker)
    ds = ds.map_batches(
        finalize_stage, batch_size=cfg.ray.batch_size, batch_format="pyarrow", num_cpus=plan.cpu_task_cpus
    )
    yield from _image_results(ds)


def _decoded(ds: "Dataset", cfg: MineConfig, plan: StagePlan) -> "Dataset":
    """The noun and decode stages over the read step's records, in batch-sized blocks."""
    from ray.data import ActorPoolStrategy

    from ovseg_mine.mine.graph.stages import NounStage, decode_stage
    from ovseg_mine.models import sam_input_size

    batch = cfg.ray.batch_size
    ds = ds.map_batches(
        NounStage,
        fn_constructor_kwargs={"cfg": cfg},
        batch_size=64,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=plan.noun_actors),
        num_cpus=NOUN_ACTOR_CPUS,
    )
    # One block per batch from here on: a Ray Data task maps its whole input bundle and emits its outputs as one
    # block when they fit the target block size (128 MiB), so blocks of many batches (a noun batch of 64, a read
    # step's shard) made the mask/match and finalize steps hand back all their rows at the end of the run, and no
    # shard was committed before then. Batch-sized blocks make each mask/match task one batch and each finalize
    # task one batch, so rows reach the driver, and shards are committed, as they are mined.
    ds = ds.repartition(target_num_rows_per_block=batch)
    return ds.map_batches(
        decode_stage,
        fn_kwargs={"sam_input_size": sam_input_size(cfg.sam.model_type) if cfg.proposals.kind == "sam" else None},
        batch_size=batch,
        batch_format="pyarrow",
        num_cpus=plan.cpu_task_cpus,
    )


def _matched(ds: "Dataset", cfg: MineConfig, weights: ResolvedWeights, plan: StagePlan, tracker: Any) -> "Dataset":
    """The mask/match stage (a pool of actors, one per GPU) over the decoded images; ``tracker``: the run's
    :class:`~ovseg_mine.mine.graph.attempts.AttemptTracker` actor."""
    from ray.data import ActorPoolStrategy

    from ovseg_mine.mine.graph.stages import MaskMatchStage

    with warnings.catch_warnings():  # actor restarts are only reachable through ray_remote_args (see pyproject)
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            MaskMatchStage,
            fn_constructor_kwargs={
                "cfg": cfg,
                "weights": weights,
                "threads": plan.threads,
                "tracker": tracker,
            },
            batch_size=cfg.ray.batch_size,
            batch_format="pyarrow",
            # min 1: a run goes on with the actors the cluster can hold (a node lost, a GPU short), and Ray Data
            # starts handing out batches once one actor is up; it starts with those that fit now (StagePlan).
            compute=ActorPoolStrategy(
                min_size=1,
                max_size=plan.gpu_actors,
                initial_size=plan.gpu_actors_at_start,
                max_tasks_in_flight_per_actor=cfg.ray.batches_in_flight,
            ),
            max_restarts=cfg.ray.max_actor_restarts,
            max_task_retries=-1,
            **plan.gpu_actor_resources,
        )


def _image_results(ds: "Dataset") -> Iterator[ImageResult]:
    """The finalize stage's rows as :class:`~ovseg_mine.mine.graph.rows.ImageResult`, as Ray Data hands them out."""
    batches = ds.iter_batches(batch_format="pyarrow", batch_size=None)
    try:
        for rows in batches:
            yield from (ImageResult.from_row(row) for row in rows.to_pylist())
    finally:  # a stop or an error in the driver ends Ray Data's execution here, before Ray is shut down
        close = getattr(batches, "close", None)
        if close is not None:
            close()
