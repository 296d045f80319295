"""Bytes moved and FLOPs of every aten op, attributed to the part of mining that issued it: the one byte counter of
the project (``decoder_bytes.py``, ``selection_bytes.py`` and ``mine_benchmark.py proxies`` all count with it).

The byte rule (issue 23, shared by every byte figure of the project): the bytes an op moves are, for each aten op
that reaches the dispatcher, the sum over its tensor inputs and tensor outputs of ``numel * element_size``, each
distinct tensor object once per op, except a tensor the op mutates (its schema's ``alias_info.is_write``: an
in-place op's ``self``, an ``out=`` argument, ``copy_``'s destination): it counts twice (read and written) when the
op also reads it (``add_``, ``gelu_``, ``baddbmm_``'s ``self``), once when the op only writes it (an ``out=``
argument not also passed as an input; ``copy_``'s, ``fill_``'s and ``zero_``'s ``self``). It is what an unfused
kernel reads and writes. Ops that launch no kernel count 0: view ops (``func.is_view``, and the aliasing
``_unsafe_view`` / ``alias`` / ``detach`` / ``lift_fresh``) and allocations without a write (``empty``,
``empty_strided``, ``empty_like``, ``new_empty``...); a 0-element tensor counts 0. The rule as first written (every
distinct tensor once, an in-place op's write left out) is kept as ``OpRecord.bytes_as_first_written``.

FLOPs are those of ``torch.utils.flop_counter``'s formulas (the registry ``FlopCounterMode`` uses: matmuls,
convolutions, attention; a multiply-add counts 2). Element-wise ops, reductions, interpolation and NMS count 0
FLOPs: on a GPU they are bound by their bytes (an element-wise op does ~1 FLOP per 4-8 bytes, ~100x below the
H100's FLOP/byte balance), so the roofline (``roofline.py``) takes their time from their bytes.

Neither depends on the device, only on shapes and dtypes: the same counts come from the meta device (no
computation) and from a real run on a CPU, with one exception the caller chooses: which aten ops an op decomposes
into can differ between backends (e.g. scaled-dot-product attention: one fused op on CUDA and on CPU when it has a
fused kernel for the inputs, its math decomposition otherwise).

Each op is attributed to a part (:data:`PARTS`) by the Python call stack: the innermost frame that matches a rule
of :data:`RULES` (file suffix, optionally a function name) names the part; no match is ``other``.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

#: The parts of mining one image, in the order they run.
PARTS = ("encoder", "decoder", "selection", "crops", "clip", "text", "other")

#: ``(file path suffix, function name or None, part)``; the innermost stack frame matching a rule wins. Shared
#: files (segment_anything's ``common.py``, ``sam.py``, open_clip's ``transformer.py``) have no rule: their
#: caller decides (``postprocess_masks`` called by the selection counts as selection, a ``LayerNorm2d`` of the
#: encoder as encoder, a transformer block of CLIP's text tower as text).
RULES: tuple[tuple[str, str | None, str], ...] = (
    ("segment_anything/modeling/image_encoder.py", None, "encoder"),
    ("ovseg_mine/mine/algorithms/sam_attention.py", None, "encoder"),
    ("ovseg_mine/mine/algorithms/sam_batch.py", "embed", "encoder"),
    ("segment_anything/modeling/mask_decoder.py", None, "decoder"),
    ("segment_anything/modeling/transformer.py", None, "decoder"),
    ("segment_anything/modeling/prompt_encoder.py", None, "decoder"),
    ("ovseg_mine/mine/algorithms/sam_decoder.py", None, "decoder"),
    ("ovseg_mine/mine/algorithms/sam_batch.py", "decode", "decoder"),
    ("ovseg_mine/mine/algorithms/sam_batch.py", "_sparse_prompts", "decoder"),
    ("ovseg_mine/mine/algorithms/sam_batch.py", "float32_forward", "decoder"),
    ("ovseg_mine/mine/algorithms/amg.py", None, "selection"),
    ("ovseg_mine/mine/algorithms/fused_amg.py", None, "selection"),
    ("segment_anything/utils/amg.py", None, "selection"),
    ("ovseg_mine/mine/algorithms/sam_batch.py", "propose", "selection"),
    ("ovseg_mine/crops.py", None, "crops"),
    ("ovseg_mine/mine/algorithms/engine.py", "_crops", "crops"),
    ("open_clip/model.py", "encode_image", "clip"),
    ("open_clip/model.py", "encode_text", "text"),
    ("ovseg_mine/text.py", None, "text"),
    ("ovseg_mine/mine/algorithms/matching.py", "encode_crops", "clip"),
    ("ovseg_mine/mine/algorithms/engine.py", "_embed_crops", "clip"),
)

_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd

#: Ops that alias an input or only allocate: no kernel reads or writes memory (0 bytes).
NO_KERNEL = frozenset(
    {"aten._unsafe_view", "aten.alias", "aten.detach", "aten.lift_fresh", "aten.empty", "aten.empty_strided"}
    | {"aten.empty_like", "aten.new_empty", "aten.new_empty_strided", "aten.set_", "aten._reshape_alias"}
    | {"aten.resize_"}
)

#: Ops whose mutated ``self`` is only written (not read): its bytes count once.
OVERWRITES = frozenset({"aten.copy_", "aten.fill_", "aten.zero_"})


def _rule_index() -> dict[str, list[tuple[str, str | None, str]]]:
    by_name: dict[str, list[tuple[str, str | None, str]]] = defaultdict(list)
    for suffix, function, part in RULES:
        by_name[suffix.rsplit("/", 1)[-1]].append((suffix, function, part))
    return by_name


_RULES_BY_FILE = _rule_index()


def part_of_stack(frame: Any = None) -> str:
    """The part (:data:`PARTS`) of the innermost frame of the current Python stack (or from ``frame`` outward)
    that matches a rule of :data:`RULES`; ``"other"`` when none does."""
    frame = frame or sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        path = code.co_filename.replace("\\", "/")
        for suffix, function, part in _RULES_BY_FILE.get(path.rsplit("/", 1)[-1], ()):
            if path.endswith(suffix) and function in (None, code.co_name):
                return part
        frame = frame.f_back
    return "other"


def tensor_bytes(tensors: list[Any]) -> int:
    """Sum of ``numel * element_size`` over the distinct tensor objects of ``tensors`` (others ignored)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


_WRITES: dict[Any, tuple[tuple[int, str, bool], ...]] = {}


def _written_arguments(func: Any) -> tuple[tuple[int, str, bool], ...]:
    """``(position, name, pure)`` of the arguments ``func`` writes (schema ``alias_info.is_write``), cached per
    overload; ``pure``: only written (an ``out=`` argument, or ``self`` of :data:`OVERWRITES`)."""
    found = _WRITES.get(func)
    if found is None:
        overwrite = str(func.overloadpacket) in OVERWRITES
        found = tuple(
            (i, a.name, a.is_out or (overwrite and a.name == "self"))
            for i, a in enumerate(func._schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write
        )
        _WRITES[func] = found
    return found


def _read_twice(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors ``func`` mutates and also reads (each counts a second time: read and written)."""
    written = _written_arguments(func)
    if not written:
        return []
    pure_ids: set[int] = set()
    twice: dict[int, torch.Tensor] = {}
    write_names = set()
    for position, name, pure in written:
        write_names.add(name)
        value = args[position] if position < len(args) else kwargs.get(name)
        for t in tree_flatten(value)[0]:
            if isinstance(t, torch.Tensor) and pure:
                pure_ids.add(id(t))
            elif isinstance(t, torch.Tensor):
                twice.setdefault(id(t), t)
    if pure_ids:  # a pure overwrite is also read when passed again as an input (``add(a, b, out=a)``)
        names = [a.name for a in func._schema.arguments]
        others = [v for n, v in zip(names, args, strict=False) if n not in write_names]
        others += [v for n, v in kwargs.items() if n not in write_names]
        for t in tree_flatten(others)[0]:
            if isinstance(t, torch.Tensor) and id(t) in pure_ids:
                twice.setdefault(id(t), t)
    return list(twice.values())


def moved_bytes(func: Any, args: tuple, kwargs: dict, out: Any, *, copies: bool | None = None) -> tuple[int, int]:
    """``(bytes by the byte rule, bytes by the rule as first written)`` of one aten op (module docstring).

    ``copies``: for a composite op, whether the kernels it decomposed into moved any bytes (a composite op moves
    nothing when they move nothing, e.g. ``reshape`` of a contiguous tensor, and its own inputs and outputs
    otherwise, whatever its schema says); None for an op that is not composite (0 for a view or an allocation)."""
    if copies is None:
        if func.is_view or str(func.overloadpacket) in NO_KERNEL:
            return 0, 0
    elif not copies:
        return 0, 0
    once = tensor_bytes(tree_flatten((args, kwargs))[0] + tree_flatten(out)[0])
    return once + tensor_bytes(_read_twice(func, args, kwargs)), once


def _cpu_flash_attention_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *_, **__) -> int:
    """``_scaled_dot_product_flash_attention_for_cpu`` (no formula in ``torch.utils.flop_counter``): as its CUDA
    flash attention, ``2 * B * H * L * S * (E + Ev)`` for ``query [B, H, L, E]``, ``key [B, H, S, E]``,
    ``value [B, H, S, Ev]`` (the two matmuls)."""
    *batch, length, e = query.shape
    source, ev = key.shape[-2], value.shape[-1]
    return 2 * math.prod(batch) * length * source * (e + ev)


def _native_mha_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *_, **__) -> int:
    """``_native_multi_head_attention`` (``nn.MultiheadAttention``'s inference fast path, CPU and CUDA; no formula
    in ``torch.utils.flop_counter``) of ``query [B, L, E]``, ``key``/``value [B, S, E]``: the three input
    projections (``2 * E * E`` per token each), the two attention matmuls (``2 * L * S * E`` each, summed over
    heads) and the output projection (``2 * E * E`` per query token)."""
    *batch, length, e = query.shape
    b, source = math.prod(batch), key.shape[-2]
    projections = 2 * b * e * e * (2 * length + 2 * source)
    return projections + 4 * b * length * source * e


_OWN_FORMULAS = {
    "aten._scaled_dot_product_flash_attention_for_cpu": _cpu_flash_attention_flops,
    "aten._native_multi_head_attention": _native_mha_flops,
}


def op_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """FLOPs of one aten op by ``torch.utils.flop_counter``'s formula for it (0 for ops without one; the CPU's
    fused attention by :func:`_cpu_flash_attention_flops`)."""
    own = _OWN_FORMULAS.get(str(func.overloadpacket))
    if own is not None:
        return own(*args, **kwargs)
    formula = flop_registry.get(func._overloadpacket)
    return int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0


def _compute_dtype(tensors: list[Any]) -> torch.dtype | None:
    """The dtype an op computes in: that of its first floating-point tensor input."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return None


@dataclass(frozen=True)
class OpRecord:
    """One counted op: ``name`` (``aten.mm``...), ``part`` (:data:`PARTS`), ``bytes`` moved (the byte rule),
    ``flops`` (0 unless ``torch.utils.flop_counter`` has a formula), ``dtype`` (its first floating input's, for
    the roofline's choice of peak; None without one), ``kernel_bytes`` (the byte rule over the ops a composite op
    decomposes into; ``bytes`` for other ops: :class:`ByteCounter`), and the same two byte counts by the rule as
    first written (``bytes_as_first_written``, ``kernel_bytes_as_first_written``: an in-place write left out)."""

    name: str
    part: str
    bytes: int
    flops: int
    dtype: torch.dtype | None
    kernel_bytes: int
    bytes_as_first_written: int = 0
    kernel_bytes_as_first_written: int = 0


class ByteCounter(TorchDispatchMode):
    """Counts bytes moved (the byte rule, module docstring) and FLOPs of every aten op run inside ``with``,
    by part (:func:`part_of_stack`), keeping one :class:`OpRecord` per op with nonzero bytes or FLOPs in
    ``records`` (for :mod:`roofline`).

    A composite op (one with a ``CompositeImplicitAutograd`` kernel: ``linear``, ``matmul``, ``conv_transpose2d``,
    ``layer_norm``, ``reshape``...) reaches the dispatcher as itself under ``torch.inference_mode`` (the autograd
    key that decomposes it is off), so the byte rule counts it as one op: its ``bytes``. It is run through its
    decomposition here, which gives its ``flops`` (the formulas are for ``mm``, ``addmm``, ``bmm``,
    ``convolution``...) and ``kernel_bytes``, the rule applied to the ops it decomposes into (what eager PyTorch
    launches: ``matmul`` of a non-contiguous operand adds a ``clone``). A composite op moves nothing when its
    parts move nothing (``reshape`` of a contiguous tensor is a view), and its inputs and outputs when they move
    something, whatever its schema says (``reshape`` is marked as a view, but makes a copy of a non-contiguous
    tensor). ``kernel_bytes`` = ``bytes`` for other ops.
    Only top-level ops are recorded and counted in ``ops`` (non-view or not).

    A plan answers the data-dependent ops on ``meta`` tensors, which have no meta kernel (``selection_bytes.py``):
    ``aten.nonzero`` returns ``[nonzero.pop(0), dim]`` rows, ``torchvision.nms`` ``[nms.pop(0)]`` indices, a copy
    of a meta tensor to the CPU (``.tolist()``, ``.cpu()``) the values ``host.pop(0)`` (reshaped to its shape);
    the answers are counted by the rule like any op. Without a plan such an op raises as it would.

    Works on any device (``meta`` included). Attributes: ``records``; ``ops`` (all ops seen, views included).

    Args:
        nonzero, nms, host: the plan's answers, in the order the ops run (empty: none).
    """

    def __init__(self, nonzero: Sequence[int] = (), nms: Sequence[int] = (), host: Sequence[Any] = ()) -> None:
        super().__init__()
        self.records: list[OpRecord] = []
        self.ops = 0
        self._parts: list[list[int]] = []
        self.nonzero, self.nms, self.host = list(nonzero), list(nms), list(host)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out, flops, kernel = NotImplemented, 0, None
        composite = torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _COMPOSITE)
        if composite:
            self._parts.append([0, 0, 0])  # FLOPs and bytes (both rules) of the kernels it decomposes into
            try:
                with self:  # the C++ composite kernel eager runs (not a Python decomposition: upsampling's is
                    out = func._op_dk(_COMPOSITE, *args, **kwargs)  # elementwise index arithmetic)
            finally:
                flops, *kernel = self._parts.pop()
        if out is NotImplemented:
            out = self._planned(func, args, kwargs)
            out = func(*args, **kwargs) if out is NotImplemented else out
            flops, kernel = op_flops(func, args, kwargs, out), None
        moved = moved_bytes(func, args, kwargs, out, copies=(kernel[1] != 0) if composite else None)
        kernel = moved if kernel is None else kernel
        if self._parts:  # a part of a composite op: counted in it
            totals = self._parts[-1]
            totals[0], totals[1], totals[2] = totals[0] + flops, totals[1] + kernel[0], totals[2] + kernel[1]
            return out
        self.ops += 1
        if moved[0] or flops or kernel[0]:
            inputs = tree_flatten((args, kwargs))[0]
            name = str(func.overloadpacket)
            dtype = _compute_dtype(inputs)
            self.records.append(OpRecord(name, part_of_stack(), moved[0], flops, dtype, kernel[0], moved[1], kernel[1]))
        return out

    def _planned(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """The plan's answer to a data-dependent op on meta tensors (class docstring); NotImplemented otherwise."""
        if not (self.nonzero or self.nms or self.host):
            return NotImplemented
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not any(t.device.type == "meta" for t in inputs):
            return NotImplemented
        name = str(func.overloadpacket)
        if name == "aten.nonzero" and self.nonzero:
            return torch.empty((self.nonzero.pop(0), inputs[0].dim()), dtype=torch.int64, device="meta")
        if name == "torchvision.nms" and self.nms:
            return torch.empty(self.nms.pop(0), dtype=torch.int64, device="meta")
        if name == "aten._to_copy" and self.host and torch.device(kwargs.get("device", "meta")).type == "cpu":
            dtype = kwargs.get("dtype") or inputs[0].dtype
            return torch.tensor(self.host.pop(0), dtype=dtype).reshape(inputs[0].shape)
        return NotImplemented

    def add(self, name: str, moved: int, flops: int = 0, dtype: torch.dtype | None = None) -> None:
        """Records ``moved`` bytes and ``flops`` as one op ``name`` (a region counted as one kernel, e.g.
        ``selection_bytes.as_one_kernel``), in the part of the caller's stack."""
        self.ops += 1
        self.records.append(OpRecord(name, part_of_stack(), moved, flops, dtype, moved, moved, moved))

    def bytes_by_part(self, field: str = "bytes") -> dict[str, int]:
        """Bytes moved per part (every part of :data:`PARTS`, 0 if none); ``field="kernel_bytes"`` for the
        decomposed count, ``bytes_as_first_written`` / ``kernel_bytes_as_first_written`` for the rule as first
        written."""
        return _sum_by_part(self.records, field)

    def flops_by_part(self) -> dict[str, int]:
        """FLOPs per part (every part of :data:`PARTS`, 0 if none)."""
        return _sum_by_part(self.records, "flops")

    def bytes_by_op(self, field: str = "bytes", records: Sequence[OpRecord] | None = None) -> dict[str, int]:
        """Bytes (``field``) per op name over ``records`` (default: all), largest first."""
        by_name: dict[str, int] = defaultdict(int)
        for r in self.records if records is None else records:
            by_name[r.name] += getattr(r, field)
        return dict(sorted(by_name.items(), key=lambda kv: -kv[1]))

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.records)

    @property
    def total_flops(self) -> int:
        return sum(r.flops for r in self.records)

    def top_ops(self, part: str, n: int = 10, field: str = "bytes") -> dict[str, int]:
        """The ``n`` op names of ``part`` that move the most bytes, with their bytes."""
        by_name = self.bytes_by_op(field, [r for r in self.records if r.part == part])
        return dict(list(by_name.items())[:n])


def _sum_by_part(records: list[OpRecord], field: str) -> dict[str, int]:
    totals = dict.fromkeys(PARTS, 0)
    for r in records:
        totals[r.part] = totals.get(r.part, 0) + getattr(r, field)
    return totals
