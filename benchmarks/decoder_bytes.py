"""Bytes moved per point prompt by SAM's mask decoder, stock vs fused (``BatchedSam.decode``), on the meta device.

The byte rule of issue 23 (``benchmarks/traffic.py`` is its official implementation; this file keeps a small local
counter of the same rule so it runs on its own): for each aten op reaching the dispatcher, the sum over its distinct
tensor inputs and outputs of ``numel * element_size``; view ops, allocations and 0-element tensors count 0. Run
under ``torch.inference_mode`` (composite ops such as ``linear`` or ``layer_norm`` reach the dispatcher as one op).
Corrected rule (the figures without a suffix): a tensor an op mutates (its schema's ``alias_info.is_write``: an
in-place op's ``self``, an ``out=`` argument, ``copy_``'s destination) counts twice, read and written, unless the op
only writes it (``out=``, ``copy_``, ``fill_``, ``zero_``, when not also passed as an input): then once. The rule
as first written (``_as_first_written``) counted every distinct tensor once, which leaves out an in-place op's write.

Usage: ``python benchmarks/decoder_bytes.py [--model vit_b] [--prompts 1024] [--batch 512]`` prints a JSON object
with ``stock`` and ``fused`` (:func:`decoder_bytes`).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_NO_KERNEL = {"aten._unsafe_view", "aten.alias", "aten.detach", "aten.lift_fresh", "aten.empty", "aten.empty_strided"}
_NO_KERNEL |= {"aten.empty_like", "aten.new_empty", "aten.new_empty_strided", "aten.set_", "aten._reshape_alias"}
_NO_KERNEL |= {"aten.resize_"}


_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd


_OVERWRITES = {"aten.copy_", "aten.fill_", "aten.zero_"}  # ops whose mutated ``self`` is written, not read


def _mutated(func: Any, args: tuple, kwargs: dict) -> dict[int, bool]:
    """``id -> read`` of the tensors ``func`` mutates (its schema's ``alias_info.is_write`` arguments): ``read``
    False for a pure overwrite (an ``out=`` argument, ``copy_``'s or ``fill_``'s or ``zero_``'s ``self``) unless the
    same tensor is also passed as an input the op reads."""
    schema = func._schema.arguments
    named = {a.name: v for a, v in zip(schema, args, strict=False)} | kwargs
    overwrite = str(func.overloadpacket) in _OVERWRITES
    written, read_ids = {}, set()
    for arg in schema:
        tensors = [t for t in tree_flatten(named.get(arg.name))[0] if isinstance(t, torch.Tensor)]
        if arg.alias_info is not None and arg.alias_info.is_write:
            pure = arg.is_out or (overwrite and arg.name == "self")
            written.update({id(t): not pure for t in tensors})
        else:
            read_ids.update(id(t) for t in tensors)
    return {i: read or i in read_ids for i, read in written.items()}


def _moved(func: Any, args: tuple, kwargs: dict, out: Any, copies: bool = False) -> tuple[int, int]:
    """``(bytes by the corrected rule, bytes by the rule as first written)`` of one op (0 for a view or an
    allocation, unless ``copies``: a composite view op such as ``reshape`` whose decomposition copied).

    As first written: each distinct tensor object among the inputs and outputs once. Corrected: a tensor the op
    mutates and also reads (an in-place op's ``self``, ``baddbmm_``'s, ``gelu_``'s) counts twice, read and
    written; a pure overwrite (``out=``, ``copy_``'s destination, ``fill_``, ``zero_``) once."""
    if (func.is_view and not copies) or str(func.overloadpacket) in _NO_KERNEL:
        return 0, 0
    tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
    seen = {id(t): t for t in tensors}
    as_written = sum(t.numel() * t.element_size() for t in seen.values())
    twice = [seen[i] for i, read in _mutated(func, args, kwargs).items() if read]
    return as_written + sum(t.numel() * t.element_size() for t in twice), as_written


class _Counter(TorchDispatchMode):
    """Bytes per op name (``by_op``: top-level ops, a composite op such as ``linear`` or ``reshape`` as one op, a
    view op only when it copied; ``kernel_by_op``: the kernels eager runs, a composite op through its
    decomposition), each ``[corrected rule, rule as first written]``."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.kernel_by_op: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self._depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        before = sum(v[1] for v in self.kernel_by_op.values())
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _COMPOSITE):
            self._depth += 1
            try:
                with self:
                    out = func._op_dk(_COMPOSITE, *args, **kwargs)
            finally:
                self._depth -= 1
        else:
            out = func(*args, **kwargs)
            _add(self.kernel_by_op[name], _moved(func, args, kwargs, out))
        if self._depth == 0:
            copied = sum(v[1] for v in self.kernel_by_op.values()) > before
            _add(self.by_op[name], _moved(func, args, kwargs, out, copies=copied))
        return out


def _add(total: list[int], moved: tuple[int, int]) -> None:
    total[0] += moved[0]
    total[1] += moved[1]


def count_bytes(fn: Callable[[], Any]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Run ``fn()`` under ``torch.inference_mode`` and the byte rule: ``(bytes per top-level aten op name, bytes
    per kernel-level op name)``, each value ``[corrected rule, rule as first written]``, largest first."""
    counter = _Counter()
    with torch.inference_mode(), counter:
        fn()
    order = lambda d: dict(sorted(d.items(), key=lambda kv: -kv[1][0]))  # noqa: E731
    return order(counter.by_op), order(counter.kernel_by_op)


def decoder_bytes(model: str = "vit_b", kernels: str = "fused", prompts: int = 1024, batch: int = 512) -> dict:
    """Bytes per prompt of ``BatchedSam.decode`` for one image (the whole call: prompts, the per-image context,
    every batch, the concatenation), with the decoder's weights in bfloat16 and its IoU head in float32 as under a
    GPU's rules, on the meta device (no computation, no checkpoint: segment_anything's builder, random init).

    Args:
        model: ``vit_b``, ``vit_l``, ``vit_h`` (segment_anything's ``sam_model_registry``) or ``tiny``.
        kernels: ``stock`` or ``fused`` (``BatchedSam``'s ``kernels``).
        prompts: point prompts; a square number (the grid is ``sqrt(prompts)`` per side).
        batch: prompts per decoder call.

    Returns:
        ``bytes_per_prompt`` (the byte rule over top-level ops), ``kernel_bytes_per_prompt`` (over the kernels
        eager runs: composite ops decomposed, copies of ``reshape`` and ``matmul`` included),
        ``inplace_bytes_per_prompt`` (the writes of in-place ops, which the rule leaves out), ``top_ops`` and
        ``top_kernel_ops`` (the 10 largest op names, bytes per prompt).
    """
    from ovseg_mine.mine.algorithms import sam_batch

    side = round(prompts**0.5)
    if side * side != prompts:
        raise ValueError(f"prompts must be a square number, got {prompts}")
    sam = _meta_sam(model)
    wrap = sam_batch._float32_iou_head  # torch.autocast refuses "meta": the wrapper is built with the CPU's type
    sam_batch._float32_iou_head = lambda decoder, device: wrap(decoder, torch.device("cpu"))
    try:
        batched = sam_batch.BatchedSam(
            sam,
            points_per_side=side,
            points_per_batch=batch,
            precision="pure_bf16",
            low_precision_decoder=True,
            kernels=kernels,
        )
    finally:
        sam_batch._float32_iou_head = wrap
    channels, grid = sam.prompt_encoder.embed_dim, sam.prompt_encoder.image_embedding_size
    features = torch.empty((1, channels, *grid), dtype=torch.bfloat16, device="meta")
    size = (480, 640)
    batched._sparse_prompts(size)  # cached per image size: not per image
    by_op, kernel_by_op = count_bytes(lambda: batched.decode(features, size))
    total = lambda d, rule: round(sum(v[rule] for v in d.values()) / prompts)  # noqa: E731
    return {
        "bytes_per_prompt": total(by_op, 0),
        "bytes_per_prompt_as_first_written": total(by_op, 1),
        "kernel_bytes_per_prompt": total(kernel_by_op, 0),
        "kernel_bytes_per_prompt_as_first_written": total(kernel_by_op, 1),
        "top_ops": {name: round(b[0] / prompts) for name, b in list(by_op.items())[:10]},
        "top_kernel_ops": {name: round(b[0] / prompts) for name, b in list(kernel_by_op.items())[:10]},
    }


def _meta_sam(model: str) -> Any:
    """A segment-anything ``Sam`` of ``model``'s shape on the meta device (random init, no checkpoint)."""
    if model == "tiny":
        from ovseg_mine.models import load_sam

        sam, _ = load_sam("tiny", "random", seed=0)
    else:
        from segment_anything import sam_model_registry

        sam = sam_model_registry[model]()
    return sam.to("meta").eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()
    result = {k: decoder_bytes(args.model, k, args.prompts, args.batch) for k in ("stock", "fused")}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
