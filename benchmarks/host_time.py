"""Time outside torch ops, measured without the profiler.

``torch.profiler`` records every op with its Python stack and inflates the host time between ops 6-8x (issue 23:
~65 us per op under the profiler against 8-14 us without). :func:`non_torch_time` measures instead:

1. the work once under :class:`OpTimer`, a ``TorchDispatchMode`` that only times each aten op reaching the
   dispatcher (``perf_counter`` around the kernel call) and counts them: wall ``W``, time inside ops ``O``,
   ``n`` ops;
2. the mode's own cost per op ``c``, calibrated on a loop of small ``addmm`` calls run with and without the mode
   (wall difference per op: the Python of ``__torch_dispatch__`` and its timer);
3. time outside ops = ``W - O - n * c``: the Python that issues the ops, the Python-to-C++ binding and the
   dispatch above the mode (what a GPU's host pays per op too), numpy, Arrow, pycocotools.

A run of the same work without the mode (wall ``W0``) gives a second estimate, ``W0 - O``, and what the work
costs unobserved (``W0``). The two bracket the truth: ``W - O - n*c`` is an upper estimate (the mode costs real
ops, with more arguments to walk, more than the calibration op), ``W0 - O`` a lower one (``O`` includes the
``OpOverload`` call's own Python and argument parsing, a few us per op, which the run without the mode pays
once, in the ``torch.*`` binding, outside ops). On tiny models under load the gap is about 10 us per op.

Limits: besides that bracket, ops run synchronously on a CPU, so ``O`` includes the kernels; on a GPU they
would overlap the host (the measure is of host work, not of what overlaps). Time spent in C++ between the ops
of one composite op (e.g. the decomposition of ``F.linear`` into ``t`` + ``addmm``) counts as outside ops; so
do frees of tensors dropped by Python between ops: glibc returns blocks over 32 MiB to the OS (``munmap``, a
CPU-only cost, ~0.1 s per GiB), so call :func:`keep_freed_memory` before loading the models to keep freed
memory in the process, as a GPU's caching allocator does. Compiled code (Inductor's C++ kernels) does not go
through the dispatcher: on compiled parts this method counts their kernels as time outside ops; use it on
eager runs.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpTimer(TorchDispatchMode):
    """Counts the aten ops reaching the dispatcher (``ops``) and the seconds spent inside them (``op_s``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.op_s = 0.0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.op_s += time.perf_counter() - start
        self.ops += 1
        return out


def mode_cost_per_op(calls: int = 3000) -> float:
    """Seconds :class:`OpTimer` adds to one op outside its timed interval (wall with the mode minus wall without,
    per call, over ``calls`` ``addmm`` of 8x8 float32 tensors; median of 3 tries)."""
    x = torch.randn(8, 8)

    def loop() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            torch.addmm(x, x, x)
        return time.perf_counter() - start

    costs = []
    with torch.inference_mode():
        loop()
        for _ in range(3):
            plain = loop()
            timer = OpTimer()
            with timer:
                observed = loop()
            costs.append((observed - plain) / calls)
    return max(0.0, sorted(costs)[1])


def non_torch_time(
    work: Callable[[], Any], *, sync: Callable[[], None] = lambda: None, repeats: int = 3
) -> dict[str, float]:
    """Time outside torch ops of one call of ``work`` (see the module docstring).

    ``work`` runs ``2 * repeats`` times, without then with the mode, and should be warm; the least of each is kept
    (a shared machine only adds time). ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each timed call, not
    inside it: waiting for the device at the end is not host work (a blocking copy inside ``work`` is an op,
    counted in ``O``). Returns seconds: ``non_torch_s`` (``W - O - n*c``), ``non_torch_s_unobserved``
    (``W0 - O``), ``op_s`` (``O``), ``wall_s`` (``W0``), ``wall_s_with_timer`` (``W``); and ``ops`` (``n``),
    ``mode_cost_us_per_op`` (``c``)."""
    cost = mode_cost_per_op()
    plain, observed, op_s, ops = float("inf"), float("inf"), float("inf"), 0
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        work()
        plain = min(plain, time.perf_counter() - start)
        sync()
        timer = OpTimer()
        start = time.perf_counter()
        with timer:
            work()
        wall = time.perf_counter() - start
        sync()
        if ops == 0 or wall - timer.op_s < observed - op_s:
            observed, op_s, ops = wall, timer.op_s, timer.ops
    return {
        "non_torch_s": observed - op_s - ops * cost,
        "non_torch_s_unobserved": plain - op_s,
        "op_s": op_s,
        "wall_s": plain,
        "wall_s_with_timer": observed,
        "ops": ops,
        "mode_cost_us_per_op": 1e6 * cost,
    }


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process (``mallopt``: no ``mmap`` for large blocks, no trimming of the
    heap), so that dropping a large tensor does not ``munmap`` it; True if applied (glibc only). Memory the
    process frees is then never returned to the OS: call it in a benchmark process only."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
