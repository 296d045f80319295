"""The fused selection's and crops' chunk bodies in a counted run, and the records that run would give compiled.

``mine_benchmark.py proxies`` counts one eager pass of the engine with :class:`traffic.ByteCounter`. Under
:class:`BodyTally` it also notes each call of the two fixed-shape chunk bodies of the fused path,
``fused_amg.selection_chunk`` (candidates' stability, area and box from their 256x256 logits) and
``crops.render_crops_from_logits`` (CLIP's crops from the logits): which records of the counter it issued, how many
candidates or crops it took (its padded chunk: what a compiled body also processes), and the image size. Then
:func:`compiled_records` gives the records of the same run with each body call replaced by one record of the bytes
Inductor's kernels move for it (``selection_bytes.inductor_bytes``: ``GraphLowering.count_bytes`` of the body
compiled on this CPU, per candidate or per crop, for that image size) and the FLOPs of the code the compiled body
runs (:func:`compiled_body_flops`: under ``torch.compile`` both bodies take the banded gathers of
``ovseg_mine.banded`` instead of the dense upsampling products, element-wise work with no FLOP formula, so a
compiled body is bound by its bytes).
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
#: ``(attribute, kind)``: where a ``MiningEngine`` keeps the bodies it calls (compiled or not: ``compiled.py``).
ENGINE_BODIES = (("_select_chunk", "selection"), ("_crop_chunk", "crops"))


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
    the engine's bodies (:data:`ENGINE_BODIES`, when ``engine`` is given: what ``MiningEngine`` calls) or else the
    module functions of :data:`BODIES`; ``counter``: the :class:`traffic.ByteCounter` whose records the calls'
    slices index."""

    counter: ByteCounter
    engine: Any = None
    calls: list[BodyCall] = field(default_factory=list)
    _saved: list[tuple[Any, str, Any]] = field(default_factory=list)

    def __enter__(self) -> BodyTally:
        import importlib

        if self.engine is not None:
            places = [(self.engine, name, kind) for name, kind in ENGINE_BODIES]
        else:
            places = [(importlib.import_module(module), name, kind) for module, name, kind in BODIES]
        for owner, name, kind in places:
            self._saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, self._wrap(getattr(owner, name), kind))
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


def compiled_body_flops(size: tuple[int, int], items: int = 4, low: int = 256, img_size: int = 1024) -> dict:
    """FLOPs per item (``{"selection": per candidate, "crops": per crop}``) of the code the two bodies run under
    ``torch.compile`` (their ``torch.compiler.is_compiling()`` branch, run eagerly here under
    :class:`traffic.ByteCounter`, ``items`` random candidates of an image of ``size`` ``(H, W)``; 224-pixel
    crops). The FLOP formulas are those of ``traffic.op_flops`` (matrix products; element-wise work counts 0)."""
    import torch
    from segment_anything.utils.transforms import ResizeLongestSide

    from ovseg_mine.crops import render_crops_from_logits
    from ovseg_mine.mine.algorithms.fused_amg import postprocess_operator, selection_chunk

    input_size = tuple(ResizeLongestSide.get_preprocess_shape(size[0], size[1], img_size))
    op = postprocess_operator((low, low), input_size, size, img_size, torch.device("cpu"))
    logits = torch.randn((items, low, low)).to(torch.bfloat16)
    image = torch.zeros((3, *size), dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, size[1], size[0]]] * items)
    ones = torch.ones(3)
    flops = {}
    saved = torch.compiler.is_compiling
    torch.compiler.is_compiling = lambda: True
    try:
        for kind, run in (
            ("selection", lambda: selection_chunk(logits, op.ay, op.ax, 0.0)),
            ("crops", lambda: render_crops_from_logits(image, logits, op.ay, op.ax, boxes, size=224, fill=ones)),
        ):
            with torch.inference_mode(), ByteCounter() as counter:
                run()
            flops[kind] = counter.total_flops / items
    finally:
        torch.compiler.is_compiling = saved
    return flops


def compiled_records(
    records: list[OpRecord],
    calls: list[BodyCall],
    per_item: dict[tuple[str, tuple[int, int]], float],
    flops_per_item: dict[tuple[str, tuple[int, int]], float] | None = None,
) -> list[OpRecord]:
    """``records`` with each body call's slice replaced by one record: ``per_item[(kind, size)] * items`` bytes
    (also its ``kernel_bytes``), ``flops_per_item[(kind, size)] * items`` FLOPs (default: the slice's own, the
    eager code's), the dtype of its op with the most FLOPs, in the body's part (``selection`` / ``crops``)."""
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
                flops=sum(r.flops for r in ops)
                if flops_per_item is None
                else round(flops_per_item[(call.kind, call.size)] * call.items),
                kernel_bytes=moved,
                bytes_as_first_written=moved,
                kernel_bytes_as_first_written=moved,
            )
        )
        index = call.stop
    return out
