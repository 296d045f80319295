"""The read step: the first Ray Data step of a mining run, turning shard tasks into record rows.

The driver hands Ray one light row per shard task (:meth:`~ovseg_mine.mine.sources.base.ShardTask.to_row`);
a Ray task per shard runs :meth:`~ovseg_mine.mine.sources.base.Source.read_shard` (listing the shard's samples,
then reading images batch by batch) and, when the run uses given masks, attaches them
(:meth:`~ovseg_mine.mine.sources.proposal_files.ProposalSource.attach`). Ray streams the batches on to the next stages
as they come, with backpressure, so a read task holds at most a batch of images beyond its shard's listing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ovseg_mine.mine.sources.base import ShardTask, Source

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from ovseg_mine.mine.sources.proposal_files import ProposalSource

#: Read tasks run at once per this many CPUs of the cluster (at least 2 at once). Read tasks reserve no CPU: the
#: actor pools may hold every CPU of a small machine (2 mask/match actors on 2 cores), and a read step that waited
#: for a CPU would then never feed them; this cap keeps them from crowding the machine instead.
CPUS_PER_READ_TASK = 4


def read_tasks(batch: "pa.Table", source: Source, given: "ProposalSource | None" = None) -> Iterator["pa.Table"]:
    """Ray Data ``map_batches`` function: the record rows of the shard tasks in ``batch`` (columns ``index``,
    ``task``), as :func:`~ovseg_mine.mine.sources.records.record_schema` tables."""
    for row in batch.to_pylist():
        for table in source.read_shard(ShardTask.from_row(row)):
            yield given.attach(table) if given is not None else table


def records_dataset(
    source: Source, tasks: list[ShardTask], given: "ProposalSource | None" = None
) -> "ray.data.Dataset":
    """The records of ``tasks`` as a streaming Ray Dataset (one read task per shard task).

    Args:
        source: the planned source (pickled to the read tasks: settings only).
        tasks: the shard tasks to read (those not done yet), in shard order.
        given: the run's given-mask source, when it has one (``--proposals coco:``/``sa1b:``).
    """
    import ray
    from ray.data import TaskPoolStrategy

    rows: list[dict[str, Any]] = [task.to_row() for task in tasks]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return ds.map_batches(
        read_tasks,
        fn_kwargs={"source": source, "given": given},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0,
        compute=TaskPoolStrategy(size=max(2, cpus // CPUS_PER_READ_TASK)),
    )


def first_records(source: Source, task: ShardTask) -> tuple[list[int], list[str]]:
    """Image ids and file names of the first batch of ``task`` (read here, in the driver): what the run's
    given-mask source is checked against before any work."""
    reader = source.read_shard(task)
    try:
        table = next(reader, None)
    finally:
        reader.close()
    if table is None:
        return [], []
    ok = [s == "ok" for s in table.column("status").to_pylist()]
    ids = [i for i, good in zip(table.column("image_id").to_pylist(), ok, strict=True) if good]
    names = [n for n, good in zip(table.column("file_name").to_pylist(), ok, strict=True) if good]
    return ids, names
