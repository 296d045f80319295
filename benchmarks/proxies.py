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
* :func:`profile_time` runs the work under ``torch.profiler`` and splits its wall time into the top-level torch
  ops, the host allocator's returns of large blocks to the OS (a CPU-only cost), and the rest: the time spent
  outside torch ops (Python, numpy, pycocotools, Arrow...).

The two modes add Python overhead to every call, so time is measured in a separate run without them.
"""

from __future__ import annotations

import bisect
import os
import sys
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


_TORCH_DIR = os.path.dirname(torch.__file__)


def call_site() -> str:
    """``path:line (function)`` of the innermost caller outside torch and this module: where a counted call was
    written (segment_anything's and open_clip's own files count as call sites)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith((_TORCH_DIR, __file__)):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    for marker in ("site-packages/", "ovseg_mine/", "benchmarks/"):
        if marker in path:
            path = path[path.index(marker) + (len(marker) if marker == "site-packages/" else 0) :]
            break
    return f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"


class SyncCounter(TorchFunctionMode):
    """Counts calls that would make the host wait for a CUDA device (see the module docstring), by kind and by
    call site (:func:`call_site`: the line that made the call)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()

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
            self.sites[f"{kind} at {call_site()}"] += 1
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
        self.sync_sites: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.names[name] += 1
        self.sites[call_site()] += 1
        if func.is_view:
            self.views += 1
        if name.endswith("nms"):
            self.syncs += 1
            self.sync_sites[f"nms at {call_site()}"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.names.values())


def count(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn`` twice, once under each counter; returns syncs (total, by kind and by call site), aten ops (all,
    non-view), the most frequent ops and the call sites with the most ops.

    The two runs are separate because any ``TorchFunctionMode`` turns off PyTorch's fast paths (e.g.
    ``nn.MultiheadAttention``'s fused kernel, which CLIP's attention takes in inference): under the sync counter
    they would be counted as the dozens of ops of their Python fallback."""
    syncs, ops = SyncCounter(), OpCounter()
    with syncs:
        fn()
    with ops:
        fn()
    return {
        "syncs": syncs.total + ops.syncs,
        "syncs_by_kind": dict(syncs.counts) | ({"nms": ops.syncs} if ops.syncs else {}),
        "syncs_by_site": dict((syncs.sites + ops.sync_sites).most_common()),
        "aten_ops": ops.total,
        "aten_ops_excluding_views": ops.total - ops.views,
        "top_ops": dict(ops.names.most_common(15)),
        "top_op_sites": dict(ops.sites.most_common(25)),
    }


#: A free of at least this many bytes makes the gap it falls in the host allocator's (:func:`profile_time`).
LARGE_FREE_BYTES = 2**20


def profile_time(fn: Callable[[], Any]) -> dict[str, float]:
    """Run ``fn`` once under ``torch.profiler`` (CPU activity, memory events) and split its wall time.

    The top-level torch ops (those not inside another op) and the gaps between them tile the run. A gap in which
    the profiler records a free of at least :data:`LARGE_FREE_BYTES` is the host allocator giving a large block
    back to the OS (glibc ``munmap``s any block above 32 MiB; the 1.6 GB attention maps of SAM's global blocks in
    float32 take ~140 ms each): that time is ``allocator_s``, which a GPU does not have (CUDA's caching
    allocator keeps freed blocks; only host frees count). Every other gap is ``non_torch_s``: Python, numpy,
    pycocotools, Arrow, PIL between ops, which on a GPU runs in series with it.

    Returns:
        ``wall_s``, ``torch_ops_s`` (the top-level ops' wall time), ``allocator_s``, ``non_torch_s`` and its two
        parts (seconds): ``non_torch_between_ops_s`` (the Python that issues the ops, between consecutive ops)
        and ``non_torch_around_ops_s`` (before the first op and after the last: turning the Arrow batch into
        jobs and the outcomes into rows); ``top_level_ops`` (a count).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    events = sorted(prof.events(), key=lambda e: (e.time_range.start, -e.time_range.end))
    frees = sorted(
        e.time_range.start
        for e in events
        if e.name == "[memory]" and e.device_type == DeviceType.CPU and e.cpu_memory_usage <= -LARGE_FREE_BYTES
    )
    tops, end = [], float("-inf")
    for e in events:
        if "::" not in e.name:
            continue
        if e.time_range.start >= end:
            tops.append((e.time_range.start, e.time_range.end))
        end = max(end, e.time_range.end)
    ops_us = sum(b - a for a, b in tops)
    allocator_us = between_us = 0.0
    for (_, gap_start), (gap_end, _) in zip(tops[:-1], tops[1:], strict=True):
        i = bisect.bisect_left(frees, gap_start)
        if i < len(frees) and frees[i] < gap_end:
            allocator_us += gap_end - gap_start
        else:
            between_us += gap_end - gap_start
    non_torch = wall - (ops_us + allocator_us) / 1e6
    return {
        "wall_s": wall,
        "torch_ops_s": ops_us / 1e6,
        "allocator_s": allocator_us / 1e6,
        "non_torch_s": non_torch,
        "non_torch_between_ops_s": between_us / 1e6,
        "non_torch_around_ops_s": non_torch - between_us / 1e6,
        "top_level_ops": len(tops),
    }
