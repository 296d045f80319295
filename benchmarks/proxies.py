"""CPU proxies of GPU cost: host syncs, aten ops (~ kernel launches) and time outside torch ops.

On a GPU three things bound a pipeline that is fast on paper: every host-device sync stalls the queue, every
kernel launch costs a few microseconds of CPU, and CPU work between ops (Python loops, numpy, pycocotools, PIL)
runs in series with the GPU. All three can be counted on a CPU:

* :class:`SyncCounter` (a ``TorchFunctionMode``) counts the calls that would sync on CUDA: ``.item()``,
  ``.cpu()``, ``.to("cpu")``, ``.numpy()``, ``.tolist()``, ``nonzero``, indexing (or assigning) with a bool mask,
  ``bool()`` / ``int()`` / ``float()`` of a tensor, ``masked_select``, ``unique``, ``repeat_interleave`` with
  tensor repeats and no ``output_size``, and the blocking copies from host to device (see :class:`SyncCounter`
  for how it tells them on a CPU); torchvision's NMS is counted by :class:`OpCounter` (its CUDA kernel copies its
  mask to the host);
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
import weakref
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


#: Functions that make a tensor from data: Python numbers or lists, numpy arrays, or a tensor.
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
#: Factories that make a tensor where their ``device`` argument says (the host without one).
_FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.linspace,
    torch.logspace,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.empty_strided,
    torch.scalar_tensor,
}
_NEW = {torch.Tensor.new_tensor, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full}
_MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu}


def _names_host(device: Any) -> bool:
    """Whether a ``device`` argument names the host: a string ``"cpu..."``. A ``torch.device`` (or an index) is the
    engine's own device, which is the CPU only in this proxy run."""
    return isinstance(device, str) and device.startswith("cpu")


def _pinned(tensor: torch.Tensor) -> bool:
    """Whether a host tensor is pinned, or stands for a pinned one: without CUDA nothing can be pinned."""
    return not torch.cuda.is_available() or tensor.is_pinned()


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a call's arguments (inside lists, tuples and dicts too)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value if isinstance(v, (torch.Tensor, list, tuple, dict)) for t in _tensors(v)]
    if isinstance(value, dict):
        return _tensors(list(value.values()))
    return []


def _host_index(index: Any, is_host: Callable[[torch.Tensor], bool]) -> bool:
    """Whether an index holds indices that live on the host: a host tensor, a numpy array or a list."""
    import numpy as np

    items = index if isinstance(index, tuple) else (index,)
    return any(
        (isinstance(i, torch.Tensor) and i.ndim > 0 and is_host(i)) or isinstance(i, (np.ndarray, list)) for i in items
    )


def _move_target(func: Any, args: tuple, kwargs: dict) -> tuple[bool, Any]:
    """``(moves, target)`` of ``.to`` / ``.cuda`` / ``.cpu`` / ``as_tensor(tensor)``: whether the call names a
    device, and which (a device argument, or a tensor whose placement is the target)."""
    if func is torch.Tensor.cpu:
        return True, "cpu"
    if func is torch.Tensor.cuda:
        return True, torch.device("cuda")
    for a in (kwargs.get("device"), *args[1:]):
        if isinstance(a, (str, torch.device, int, torch.Tensor)) and not isinstance(a, bool):
            return True, a
    return False, None


class SyncCounter(TorchFunctionMode):
    """Counts calls that would make the host wait for a CUDA device (see the module docstring), by kind and by
    call site (:func:`call_site`: the line that made the call).

    Host-to-device copies: on CUDA a copy from pageable host memory blocks the host until it is done. The proxy
    runs on a CPU, where the engine's device is the CPU too, so the counter keeps the placement a CUDA run would
    have. A tensor is on the *host* when the counted code made it there -- ``torch.from_numpy`` / ``frombuffer``,
    ``torch.tensor`` / ``as_tensor`` / ``asarray`` of Python or numpy data without a device, a factory (``zeros``,
    ``arange``...) without a device, a ``"cpu"`` string as the device, ``.cpu()`` / ``.to("cpu")`` -- or computed
    from host tensors only. Every other tensor is on the *device*: the models' weights, tensors made before the
    count began, whatever was made with a ``torch.device`` (the engine's device) or computed with a device tensor.
    Counted kinds (on top of the syncs of the module docstring, which count whatever the tensor's placement):

    * ``h2d_data``: a device tensor made from Python or numpy data (``torch.tensor`` / ``as_tensor`` /
      ``asarray`` with a device; ``Tensor.new_tensor`` of a device tensor);
    * ``h2d_copy``: a host tensor moved to the device (``.to(device)``, ``.cuda()``, ``as_tensor(t, device=)``,
      ``device_tensor.copy_(host)``, ``device_tensor[...] = host`` of at least one dimension), unless the copy is
      ``non_blocking`` from pinned memory. Without CUDA nothing can be pinned (``pin_memory()`` raises), so there
      a ``non_blocking`` copy is taken for the pinned one the code makes on CUDA (``tensor.pin_memory()`` when
      the device is CUDA, then ``.to(device, non_blocking=True)`` on every device, which on a CPU returns the
      tensor itself);
    * ``h2d_index``: a device tensor indexed (read or assigned) with host indices (a host tensor of at least one
      dimension, a numpy array, a list);
    * ``d2h_copy``: ``host_tensor.copy_(device_tensor)`` without ``non_blocking``.

    Limits: a host tensor made before the count began is taken for a device tensor (its copies are missed).
    ``torch.from_numpy`` and ``torch.frombuffer`` do not reach a ``TorchFunctionMode``: they are wrapped while
    counting. ``.to(device)`` of a host tensor returns a view of it here (on a CPU it would return the tensor
    itself), so that the copy is a device tensor while its source stays a host one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self._host: dict[int, weakref.ref] = {}

    def __enter__(self) -> "SyncCounter":
        # torch.from_numpy / frombuffer do not reach a TorchFunctionMode: wrapped while counting, to mark their tensors
        self._wrapped = {name: getattr(torch, name) for name in ("from_numpy", "frombuffer")}
        for name, original in self._wrapped.items():
            setattr(torch, name, self._host_maker(original))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, original in self._wrapped.items():
            setattr(torch, name, original)

    def _host_maker(self, original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def make(*args: Any, **kwargs: Any) -> torch.Tensor:
            tensor = original(*args, **kwargs)
            self._mark(tensor, True)
            return tensor

        return make

    def is_host(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is on the host in the CUDA run this counter stands for (see the class docstring)."""
        ref = self._host.get(id(tensor))
        return ref is not None and ref() is tensor

    def _mark(self, value: Any, host: bool) -> None:
        for tensor in _tensors(value):
            key = id(tensor)
            if host:
                self._host[key] = weakref.ref(tensor, lambda ref, key=key: self._forget(key, ref))
            else:
                self._host.pop(key, None)

    def _forget(self, key: int, ref: weakref.ref) -> None:
        if self._host.get(key) is ref:
            del self._host[key]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kinds = [self._sync_kind(func, args, kwargs), self._copy_kind(func, args, kwargs)]
        result = func(*args, **kwargs)
        result = self._place(func, args, kwargs, result)
        for kind in kinds:
            if kind:
                self.counts[kind] += 1
                self.sites[f"{kind} at {call_site()}"] += 1
        return result

    @staticmethod
    def _sync_kind(func, args: tuple, kwargs: dict) -> str | None:
        """The kind of a device-to-host sync (module docstring), or None."""
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
        elif func is torch.Tensor.to and _names_host(_move_target(func, args, kwargs)[1]):
            kind = "to_cpu"
        return kind

    def _copy_kind(self, func, args: tuple, kwargs: dict) -> str | None:
        """The kind of a blocking copy between host and device (class docstring), or None."""
        source = args[0] if args else kwargs.get("data", kwargs.get("obj"))
        non_blocking = bool(kwargs.get("non_blocking")) or any(a is True for a in args[2:])
        if func in _FROM_DATA or func is torch.Tensor.new_tensor:
            data = args[1] if func is torch.Tensor.new_tensor else source
            device = kwargs.get("device")
            if func is torch.Tensor.new_tensor and device is None:
                device = "cpu" if self.is_host(args[0]) else torch.device("cuda")
            if device is None or _names_host(device):
                return None
            if not isinstance(data, torch.Tensor):
                return "h2d_data"
            source, func = data, torch.Tensor.to
        if func in _MOVES or func is torch.Tensor.to:
            moves, target = _move_target(func, args, kwargs)
            if isinstance(target, torch.Tensor):
                target = "cpu" if self.is_host(target) else torch.device("cuda")
            if moves and not _names_host(target) and self.is_host(source):
                return None if (non_blocking and _pinned(source)) else "h2d_copy"
        elif func is torch.Tensor.copy_:
            dst, src = args[0], args[1]
            if not self.is_host(dst) and self.is_host(src) and not (non_blocking and _pinned(src)):
                return "h2d_copy"
            if self.is_host(dst) and not self.is_host(src) and not non_blocking:
                return "d2h_copy"
        elif func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and not self.is_host(args[0]):
            if func is torch.Tensor.__setitem__ and isinstance(args[2], torch.Tensor):
                if args[2].ndim > 0 and self.is_host(args[2]):
                    return "h2d_copy"
            if _host_index(args[1], self.is_host):
                return "h2d_index"
        return None

    def _place(self, func, args: tuple, kwargs: dict, result: Any) -> Any:
        """Mark ``result`` host or device (class docstring); returns it (a view of it for a host tensor moved to the
        device in place)."""
        device = kwargs.get("device")
        if func in _FACTORIES or (func in _FROM_DATA and not isinstance(args[0] if args else None, torch.Tensor)):
            host = device is None or _names_host(device)
        elif func in _MOVES or func in _FROM_DATA or func in _NEW:
            moves, target = _move_target(func, args, kwargs) if func in _MOVES else (device is not None, device)
            source = args[0]
            if not moves:  # a new dtype, or a tensor like ``source``: where the source is
                host = self.is_host(source)
            elif isinstance(target, torch.Tensor):
                host = self.is_host(target)
            else:
                host = _names_host(target)
            if not host and result is source and self.is_host(source):
                result = result.view_as(result)  # the device's copy; the host tensor stays one
        else:
            inputs = _tensors(args) + _tensors(kwargs)
            host = bool(inputs) and all(self.is_host(t) for t in inputs) and (device is None or _names_host(device))
            if not host:
                return result
        self._mark(result, host)
        return result

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
