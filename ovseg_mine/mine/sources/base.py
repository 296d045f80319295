"""What every source kind provides: a shard plan made of light tasks, and a read step that turns one task into
record rows (:mod:`ovseg_mine.mine.sources.records`) inside Ray.

A :class:`Source` is built in the driver from a location and the run's :class:`~ovseg_mine.config.SourceConfig`.
:meth:`Source.plan` lists the input (files, or for COCO the id-sorted records) and returns a :class:`SourcePlan`:
one :class:`ShardTask` per output shard, each naming its input (a file, a row range, a chunk of records) and
what identifies it (``input``: recorded in the shard's done record, so that a changed input is redone, never
mixed). :meth:`Source.read_shard` runs in a Ray task: it lists the task's samples (cheap: names, keys, light
columns), then yields exactly one record row per sample, reading images as it goes. Every file is opened
through :mod:`ovseg_mine.storage`, so a URI (``s3://``, ``gs://``) reads like a local path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ovseg_mine.config import SourceConfig
from ovseg_mine.done_record import Reject

if TYPE_CHECKING:
    import pyarrow as pa

    from ovseg_mine.config import NounsConfig


class SourceError(ValueError):
    """A source that cannot be used at all (missing, malformed, a missing column, an id column that is not
    integer): a one-line error raised before any work starts."""


@dataclass(frozen=True)
class ShardTask:
    """One output shard's input: light enough that the driver holds one per shard, not one per image.

    Attributes:
        index: the output shard index (``shards/shard-{index:05d}.parquet``).
        input: JSON-able identity of the input (file name, size, modification time, row range, or a digest of
            a chunk of records); written to the shard's done record and compared on resume.
        size: rows the read step will yield, when the plan knows it (None: counted by the read step).
        payload: JSON-able arguments of :meth:`Source.read_shard` (a file's location, a row range, records).
        expected: when ``size`` is None, the rows the input's own metadata announces (img2dataset's
            ``NNNNN_stats.json`` ``count``): the progress bar's total, not a promise (a cut tar yields others).
    """

    index: int
    input: dict[str, Any]
    size: int | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    expected: int | None = None

    def to_row(self) -> dict[str, Any]:
        """The task as a Ray Data row (JSON text, so Arrow stores it whatever its shape)."""
        return {"index": self.index, "task": json.dumps(asdict(self), sort_keys=True)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "ShardTask":
        return cls(**json.loads(row["task"]))


@dataclass
class SourcePlan:
    """The shard plan of a source.

    Attributes:
        tasks: one per output shard, in shard order.
        info: the manifest's ``source`` section: ``kind``, ``location``, the columns used, the revision or
            the input files' identity, counts.
        rejects: rejects found while planning (COCO: malformed entries, duplicate ids...), listed in the
            manifest as they are; rejects found while reading travel as rows instead.
        image_root: the folder that ``file_name`` is relative to, for sources whose images are files there
            (COCO, folder, img2dataset files); consumers (finetune, publish --embed) read images from it.
    """

    tasks: list[ShardTask]
    info: dict[str, Any]
    rejects: list[Reject] = field(default_factory=list)
    image_root: str | None = None

    @property
    def total(self) -> int | None:
        """Rows of the whole plan (the progress bar's total): every task's size, or where a task's size is
        unknown the rows its input's metadata announces (``ShardTask.expected``); None when a task has neither."""
        sizes = [t.size if t.size is not None else t.expected for t in self.tasks]
        return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[arg-type]

    @property
    def exact_total(self) -> int | None:
        """Rows of the whole plan when every task's size is known (the manifest's ``images_selected``)."""
        sizes = [t.size for t in self.tasks]
        return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Screening:
    """Caption screening settings every source applies (from the run's source and nouns config)."""

    captions_per_image: int = 1
    max_caption_chars: int = 1000
    skip_non_english: bool = True

    @classmethod
    def of(cls, source: SourceConfig, nouns: "NounsConfig") -> "Screening":
        return cls(source.captions_per_image, nouns.max_caption_chars, nouns.skip_non_english)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`ovseg_mine.mine.sources.records.image_row`."""
        return {
            "captions_per_image": self.captions_per_image,
            "max_caption_chars": self.max_caption_chars,
            "skip_non_english": self.skip_non_english,
        }


class Source:
    """Base class of the source kinds; see the module docstring.

    Args:
        location: what follows ``KIND:`` in ``--source`` (a path or URI; for ``hf`` also a Hub name).
        cfg: the run's source config (columns, split, selection).
        screening: caption screening settings.

    Subclasses set :attr:`kind` and implement :meth:`plan` and :meth:`read_shard`; instances are pickled to
    Ray workers, so they hold settings only (no open files, no data).
    """

    kind: ClassVar[str] = ""

    def __init__(self, location: str, cfg: SourceConfig, screening: Screening) -> None:
        self.location = location
        self.cfg = cfg
        self.screening = screening

    def plan(self, images_per_shard: int) -> SourcePlan:
        """List the input and plan the output shards, ``cfg.limit`` applied (``cfg.image_ids`` too where the
        plan reads the records, as COCO does; else by the read step).

        Raises:
            SourceError: the source cannot be used (one line, before any work).
        """
        raise NotImplementedError

    def samples(self, task: ShardTask) -> list[Any]:
        """The task's samples in shard order, light (names, keys, ids; no image bytes), ``cfg.image_ids`` and
        the task's ``stop`` applied: one record row each."""
        raise NotImplementedError

    def rows(self, task: ShardTask, samples: list[Any]) -> Iterator[dict[str, Any]]:
        """One record row (:func:`~ovseg_mine.mine.sources.records.image_row` or ``reject_row``) per sample of
        :meth:`samples`, in the same order, reading images as it goes."""
        raise NotImplementedError

    def read_shard(self, task: ShardTask) -> Iterator["pa.Table"]:
        """Yield the record rows of one task as Arrow tables (:func:`ovseg_mine.mine.sources.records.batches`):
        exactly one row per selected sample, each stamped with the shard, its size and its position.

        A task whose payload has ``only_ids`` (``mine --retry-failed``) yields only the rows of those image ids,
        stamped as in the whole shard; the shard's input is read again to find them."""
        from ovseg_mine.mine.sources.records import batches

        samples = self.samples(task)
        only = task.payload.get("only_ids")
        keep = frozenset(only) if only is not None else None
        yield from batches(self.rows(task, samples), task.index, len(samples), keep=keep)

    def count(self, task: ShardTask) -> int:
        """Rows :meth:`read_shard` yields for ``task`` (lists its samples)."""
        return len(self.samples(task))

    def selected(self, image_id: int) -> bool:
        """True when ``cfg.image_ids`` is unset or names ``image_id``."""
        if self.cfg.image_ids is None:
            return True
        wanted = getattr(self, "_wanted_ids", None)
        if wanted is None:
            wanted = self._wanted_ids = frozenset(self.cfg.image_ids)
        return image_id in wanted

    def select(self, samples: list[Any], task: ShardTask, image_id: Any, files: list[Any] = ()) -> list[Any]:
        """``samples`` whose ``image_id(sample)`` is selected, cut at the task's ``stop``, then ``files``: the
        samples that stand for a problem of the input file itself (a tar's unreadable tail, an unreadable table
        file), which become file rejects (:func:`~ovseg_mine.mine.sources.records.file_reject_row`) whatever the
        selection."""
        if self.cfg.image_ids is not None:
            samples = [s for s in samples if self.selected(image_id(s))]
        stop = task.payload.get("stop")
        return (samples if stop is None else samples[:stop]) + list(files)

    def sized(self, size: int | None) -> int | None:
        """A task's size for the plan: None when ``cfg.image_ids`` selects rows (only the read step knows)."""
        return None if self.cfg.image_ids is not None else size


def limit_tasks(tasks: list[ShardTask], limit: int | None, count: Any) -> list[ShardTask]:
    """Keep the tasks needed for the first ``limit`` rows in plan order; the last one is cut to a row range.

    ``count(task)`` returns a task's row count when its ``size`` is unknown (e.g. a tar's samples). A cut
    task gets ``payload["stop"]`` and ``size``, and ``input["rows"] = [0, stop]`` (so a later, larger limit
    redoes that shard instead of keeping the cut one).
    """
    if limit is None:
        return tasks
    kept: list[ShardTask] = []
    left = limit
    for task in tasks:
        if left <= 0:
            break
        size = task.size if task.size is not None else count(task)
        if size > left:
            task = ShardTask(task.index, {**task.input, "rows": [0, left]}, left, {**task.payload, "stop": left})
            size = left
        else:
            task = ShardTask(task.index, task.input, size, task.payload)
        kept.append(task)
        left -= size
    return kept
