"""The fused selection's and crops' chunk bodies in a counted run, and the records that run would give compiled.

``mine_benchmark.py proxies`` counts one eager pass of the engine with :class:`traffic.ByteCounter`. Under
:class:`BodyTally` it also notes each call of the two fixed-shape chunk bodies of the fused path,
``fused_amg.selection_chunk`` (candidates' stability, area and box from their 256x256 logits) and
``crops.render_crops_from_logits`` (CLIP's crops from the logits): which records of the counter it issued, how many
candidates or crops it took (its padded chunk: what a compiled body also processes), and the image size. Then
:func:`compiled_records` gives the records of the same run with each body call replaced by one record of the bytes
Inductor's kernels move for it (``selection_bytes.inductor_bytes``: ``GraphLowering.count_bytes`` of the body
compiled on this CPU, per candidate or per crop, for that image size) and the FLOPs of the eager ops it replaces.
The glue between the bodies (``index_select``, ``cat``, ``sort``, NMS, normalization outside a body) stays as
counted eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from traffic import ByteCounter, OpRecord

#: ``(module, function name, kind)`` of the chunk bodies.
BODIES = (
    ("ovseg_mine.mine.algorithms.fused_amg", "selection_chunk", "selection"),
    ("ovseg_mine.crops", "render_crops_from_logits", "crops"),
)


@dataclass
class BodyCall:
    """One chunk body call: ``kind`` (``selection`` or ``crops``), ``size`` ``(H, W)`` of the image, ``items``
    (candidates or crops of its chunk, padding included) and ``start``/``stop``, the slice of the counter's
    ``records`` it issued."""

    kind: str
    size: tuple[int, int]
    items: int
    start: int
    stop: int


@dataclass
class BodyTally:
    """Context manager that notes every chunk body call (:class:`BodyCall`) made while it is active, by wrapping
    the module functions of :data:`BODIES` (the engine looks them up at call time); ``counter``: the
    :class:`traffic.ByteCounter` whose records the calls' slices index."""

    counter: ByteCounter
    calls: list[BodyCall] = field(default_factory=list)
    _saved: list[tuple[Any, str, Any]] = field(default_factory=list)

    def __enter__(self) -> BodyTally:
        import importlib

        for module_name, name, kind in BODIES:
            module = importlib.import_module(module_name)
            self._saved.append((module, name, getattr(module, name)))
            setattr(module, name, self._wrap(getattr(module, name), kind))
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, name, fn in self._saved:
            setattr(module, name, fn)
        self._saved.clear()

    def _wrap(self, fn: Any, kind: str) -> Any:
        def body(*args: Any, **kwargs: Any) -> Any:
            low, ay, ax = args[1:4] if kind == "crops" else args[:3]
            start = len(self.counter.records)
            out = fn(*args, **kwargs)
            size = (int(ay.shape[0]), int(ax.shape[0]))
            self.calls.append(BodyCall(kind, size, int(low.shape[0]), start, len(self.counter.records)))
            return out

        return body

    def items(self, kind: str) -> int:
        """Candidates (``selection``) or crops (``crops``) that went through the bodies, padding included."""
        return sum(c.items for c in self.calls if c.kind == kind)

    def sizes(self) -> list[tuple[int, int]]:
        """The image sizes the bodies ran for."""
        return sorted({c.size for c in self.calls})


def compiled_records(
    records: list[OpRecord], calls: list[BodyCall], per_item: dict[tuple[str, tuple[int, int]], float]
) -> list[OpRecord]:
    """``records`` with each body call's slice replaced by one record: ``per_item[(kind, size)] * items`` bytes
    (also its ``kernel_bytes``), the slice's FLOPs, the dtype of its op with the most FLOPs, in the body's part
    (``selection`` / ``crops``)."""
    inside: dict[int, BodyCall] = {}
    for call in calls:
        inside[call.start] = call
    out: list[OpRecord] = []
    index = 0
    while index < len(records):
        call = inside.get(index)
        if call is None or call.stop == call.start:
            out.append(records[index])
            index += 1
            continue
        ops = records[call.start : call.stop]
        moved = round(per_item[(call.kind, call.size)] * call.items)
        heaviest = max(ops, key=lambda r: r.flops)
        name = f"compiled {call.kind} chunk body"
        out.append(
            replace(
                heaviest,
                name=name,
                part=call.kind,
                bytes=moved,
                flops=sum(r.flops for r in ops),
                kernel_bytes=moved,
                bytes_as_first_written=moved,
                kernel_bytes_as_first_written=moved,
            )
        )
        index = call.stop
    return out
