"""The training loop on several processes, GPUs or nodes: Ray Train's TorchTrainer with DDP.

Each Ray Train worker runs :func:`ovseg_mine.finetune.train.train_worker` with its world rank; Ray Train
creates the torch process group (NCCL on GPUs, gloo on CPUs) and the trainable module is wrapped in
``DistributedDataParallel`` by the loop. Every worker reads its own share of the shards' rows. Rank 0 writes
the outputs and the resume state to ``--out``: on several nodes ``--out``, the shards and the images must be
on a filesystem that every node sees (the same path everywhere).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ovseg_mine.finetune.config import FinetuneConfig
from ovseg_mine.storage import first_line

log = logging.getLogger("ovseg_mine")
RAY_START_ERRORS = (ConnectionError, RuntimeError, ValueError, TimeoutError)


class DistributedError(RuntimeError):
    """Ray or Ray Train could not run the training (cannot start or join Ray, a worker failed)."""


def _worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: run the loop with this worker's rank; report the result."""
    import ray.train

    from ovseg_mine.finetune.train import train_worker

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    ctx = ray.train.get_context()
    meta = train_worker(
        config, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), local_rank=ctx.get_local_rank()
    )
    last = meta["curve"][-1] if meta.get("curve") else {}
    ray.train.report({"loss": last.get("loss"), "step": last.get("step"), "complete": bool(meta.get("complete"))})


def run_distributed(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run ``cfg`` on ``cfg.num_workers`` Ray Train workers; returns the run's metadata.

    Joins the Ray cluster at ``cfg.ray_address``, or starts a local Ray. Each worker gets one GPU when
    ``cfg.use_gpu`` (None: when the cluster has GPUs), else one CPU and the gloo backend.

    Raises:
        DistributedError: Ray cannot start or be joined, or the training failed on a worker (the message
            carries the worker's error).
    """
    import ray
    import ray.exceptions
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ovseg_mine.finetune.checkpoint import read_metadata

    try:
        if not ray.is_initialized():
            ray.init(address=cfg.ray_address, log_to_driver=True, configure_logging=False)
    except Exception as exc:
        # Ray reports a bad address or a failed start as ConnectionError, RuntimeError, ValueError or TimeoutError,
        # and a start-up timeout as a bare Exception; anything else is a bug, not Ray failing to start.
        if not isinstance(exc, RAY_START_ERRORS) and type(exc) is not Exception:
            raise
        raise DistributedError(f"cannot start or join Ray ({cfg.ray_address or 'local'}): {first_line(exc)}") from exc
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    config = cfg.model_dump(mode="json") | {"use_gpu": use_gpu}
    trainer = TorchTrainer(
        _worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name="ovseg-mine-finetune", storage_path=str((Path(cfg.out) / "ray").resolve())),
    )
    try:
        trainer.fit()
    except (ray.train.TrainingFailedError, ray.exceptions.RayError) as exc:  # wraps the worker's exception
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise DistributedError(
            f"distributed training failed: {type(cause).__name__}: {first_line(cause, 500)}"
        ) from exc
    return read_metadata(cfg.out)
