"""CPU proxies of GPU cost: host syncs, aten ops (~ kernel launches) and time outside torch ops.

On a GPU three things bound a pipeline that is fast on paper: every host-device sync stalls the queue, every
kernel launch costs a few microseconds of CPU, and CPU work between ops (Python loops, numpy, pycocotools, PIL)
runs in series with the GPU. All three can be counted on a CPU:

* :class:`SyncCounter` (a ``TorchFunctionMode``) counts the calls that would sync on CUDA: ``.item()``,
  ``.cpu()``, ``.to("cpu")``, ``.numpy()``, ``.tolist()``, ``nonzero``, indexing (or assigning) with a bool mask,
  ``bool()`` / ``int()`` / ``float()`` of a tensor, ``masked_select``, ``unique``, ``repeat_interleave`` with
  tensor repeats and no ``output_size``; torchvision's NMS is counted by :class:`OpCounter` (its CUDA kernel
  copies its mask to the host);
* :class:`OpCounter` (a ``TorchDispatchMode``) counts aten ops, with and without views (a view launches no
  kernel);
* :func:`profile_time` runs the work under ``torch.profiler`` and returns wall time and the self time of all
  torch ops: wall minus op time is the time spent outside torch ops (Python, numpy, pycocotools...).

The two modes add Python overhead to every call, so time is measured in a separate run without them.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_METHODS = {
    torch.Tensor.item: "item",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.nonzero: "nonzero",
    torch.nonzero: "nonzero",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__int__: "int",
    torch.Tensor.__float__: "float",
    torch.Tensor.__index__: "index",
    torch.masked_select: "masked_select",
    torch.Tensor.masked_select: "masked_select",
    torch.unique: "unique",
    torch.Tensor.unique: "unique",
}


def _has_bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _is_cpu(device: Any) -> bool:
    """``.to("cpu")`` written out: a copy to the host. (A ``torch.device`` argument is the engine's own device,
    which is the CPU only in this proxy run.)"""
    return isinstance(device, str) and device.startswith("cpu")


class SyncCounter(TorchFunctionMode):
    """Counts calls that would make the host wait for a CUDA device (see the module docstring), by kind."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _SYNC_METHODS.get(func)
        if func is torch.nonzero and kwargs.get("as_tuple"):
            kind = "nonzero"
        elif func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _has_bool_index(args[1]):
            kind = "bool_index"
        elif (
            func in (torch.repeat_interleave, torch.Tensor.repeat_interleave)
            and isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor)
            and kwargs.get("output_size") is None  # with the output size given, CUDA needs no sync
        ):
            kind = "repeat_interleave"
        elif func in (torch.Tensor.to,) and any(
            (isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu")
            for a in (*args[1:], kwargs.get("device"))
            if a is not None and not isinstance(a, torch.dtype)
        ):
            kind = "to_cpu"
        if kind:
            self.counts[kind] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class OpCounter(TorchDispatchMode):
    """Counts aten (and torchvision) ops as they reach the dispatcher: ``total``, ``views`` (ops that only make a
    view), and the op names; torchvision's ``nms`` is also listed in ``syncs`` (it syncs on CUDA)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: Counter[str] = Counter()
        self.views = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.names[name] += 1
        if func.is_view:
            self.views += 1
        if name.endswith("nms"):
            self.syncs += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.names.values())


def count(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn`` once under both counters; returns syncs (total and by kind), aten ops (all, non-view) and the
    most frequent ops."""
    syncs, ops = SyncCounter(), OpCounter()
    with syncs, ops:
        fn()
    return {
        "syncs": syncs.total + ops.syncs,
        "syncs_by_kind": dict(syncs.counts) | ({"nms": ops.syncs} if ops.syncs else {}),
        "aten_ops": ops.total,
        "aten_ops_excluding_views": ops.total - ops.views,
        "top_ops": dict(ops.names.most_common(15)),
    }


def profile_time(fn: Callable[[], Any]) -> dict[str, float]:
    """Run ``fn`` once under ``torch.profiler`` (CPU activity): wall seconds, seconds inside torch ops (sum of
    every op's self time) and their difference, the time spent outside torch ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    op_us = sum(e.self_cpu_time_total for e in prof.events() if "::" in e.name)
    return {"wall_s": wall, "torch_ops_s": op_us / 1e6, "non_torch_s": wall - op_us / 1e6}
