"""Bytes moved and FLOPs of every aten op, attributed to the part of mining that issued it.

The byte rule (issue 23, shared by every byte figure of the project): the bytes an op moves are, for each aten op
that reaches the dispatcher, the sum over its tensor inputs and tensor outputs of ``numel * element_size``, each
distinct tensor object once per op. It is what an unfused kernel reads and writes. Ops that launch no kernel
count 0: view ops (``func.is_view``, and the aliasing ``_unsafe_view`` / ``alias`` / ``detach`` / ``lift_fresh``)
and allocations without a write (``empty``, ``empty_strided``, ``empty_like``); a 0-element tensor counts 0.

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
    | {"aten.empty_like", "aten.set_", "aten._reshape_alias", "aten.resize_"}
)


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
    decomposes into; ``bytes`` for other ops: :class:`ByteCounter`)."""

    name: str
    part: str
    bytes: int
    flops: int
    dtype: torch.dtype | None
    kernel_bytes: int


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

    Works on any device (``meta`` included). Attributes: ``records``; ``ops`` (all ops seen, views included).
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[OpRecord] = []
        self.ops = 0
        self._parts: list[list[int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out, flops, kernel_bytes = NotImplemented, 0, None
        composite = torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _COMPOSITE)
        if composite:
            self._parts.append([0, 0])  # FLOPs and bytes of the kernels it decomposes into
            try:
                with self:  # the C++ composite kernel eager runs (not a Python decomposition: upsampling's is
                    out = func._op_dk(_COMPOSITE, *args, **kwargs)  # elementwise index arithmetic)
            finally:
                flops, kernel_bytes = self._parts.pop()
        if out is NotImplemented:
            out = func(*args, **kwargs)
            flops, kernel_bytes = op_flops(func, args, kwargs, out), None
        name = str(func.overloadpacket)
        inputs, _ = tree_flatten((args, kwargs))
        moved = 0
        if kernel_bytes != 0 if composite else not (func.is_view or name in NO_KERNEL):
            moved = tensor_bytes(inputs + tree_flatten(out)[0])
        kernel_bytes = moved if kernel_bytes is None else kernel_bytes
        if self._parts:  # a part of a composite op: counted in it
            self._parts[-1][0] += flops
            self._parts[-1][1] += kernel_bytes
            return out
        self.ops += 1
        if moved or flops or kernel_bytes:
            self.records.append(OpRecord(name, part_of_stack(), moved, flops, _compute_dtype(inputs), kernel_bytes))
        return out

    def bytes_by_part(self, field: str = "bytes") -> dict[str, int]:
        """Bytes moved per part (every part of :data:`PARTS`, 0 if none); ``field="kernel_bytes"`` for the
        decomposed count."""
        return _sum_by_part(self.records, field)

    def flops_by_part(self) -> dict[str, int]:
        """FLOPs per part (every part of :data:`PARTS`, 0 if none)."""
        return _sum_by_part(self.records, "flops")

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.records)

    @property
    def total_flops(self) -> int:
        return sum(r.flops for r in self.records)

    def top_ops(self, part: str, n: int = 10, field: str = "bytes") -> dict[str, int]:
        """The ``n`` op names of ``part`` that move the most bytes, with their bytes."""
        by_name: dict[str, int] = defaultdict(int)
        for r in self.records:
            if r.part == part:
                by_name[r.name] += getattr(r, field)
        return dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:n])


def _sum_by_part(records: list[OpRecord], field: str) -> dict[str, int]:
    totals = dict.fromkeys(PARTS, 0)
    for r in records:
        totals[r.part] = totals.get(r.part, 0) + getattr(r, field)
    return totals
