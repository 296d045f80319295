"""Time outside torch ops, measured without the profiler.

``torch.profiler`` records every op with its Python stack and inflates the host time between ops 6-8x (issue 23:
~65 us per op under the profiler against 8-14 us without). :func:`non_torch_time` measures instead:

1. the work once under :class:`OpTimer`, a ``TorchDispatchMode`` that only times each aten op reaching the
   dispatcher (clocks read around the kernel call) and counts them: time ``W``, time inside ops ``O``, ``n`` ops;
2. the mode's own cost per op ``c``, calibrated on a loop of small ``addmm`` calls run with and without the mode
   (difference per op: the Python of ``__torch_dispatch__`` and its clocks);
3. time outside ops = ``W - O - n * c``: the Python that issues the ops, the Python-to-C++ binding and the
   dispatch above the mode (what a GPU's host pays per op too), numpy, Arrow, pycocotools.

The clock of the figure is the calling thread's CPU time (``time.thread_time``): on a shared machine the wall
time between two ops also counts the moments the scheduler gave the core to another process (on 2 cores at load
10 the same batch's wall time varied 1.2-7.6 s); the wall-clock figures are reported beside it. Ops run on
intra-op threads too, but the calling thread takes part in each parallel region, so its CPU time inside ops
is what is subtracted, and what is left is its own work outside ops.

A run of the same work without the mode (``W0``) gives a second estimate, ``W0 - O``, and what the work costs
unobserved. The two bracket the truth: ``W - O - n*c`` is an upper estimate (the mode costs real ops, with more
arguments to walk, more than the calibration op), ``W0 - O`` a lower one (``O`` includes the ``OpOverload``
call's own Python and argument parsing, a few us per op, which the run without the mode pays once, in the
``torch.*`` binding, outside ops).

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
    """Counts the aten ops reaching the dispatcher (``ops``) and the time spent inside them: wall seconds
    (``op_s``) and this thread's CPU seconds (``op_cpu_s``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.op_s = 0.0
        self.op_cpu_s = 0.0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        out = func(*args, **(kwargs or {}))
        self.op_cpu_s += time.thread_time() - cpu
        self.op_s += time.perf_counter() - wall
        self.ops += 1
        return out


def _timed(work: Callable[[], Any], timer: OpTimer | None = None) -> tuple[float, float]:
    """Wall and this thread's CPU seconds of ``work()`` (under ``timer`` if given)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    if timer is None:
        work()
    else:
        with timer:
            work()
    return time.perf_counter() - wall, time.thread_time() - cpu


def mode_cost_per_op(calls: int = 3000) -> tuple[float, float]:
    """Wall and CPU seconds :class:`OpTimer` adds to one op outside its timed interval (with the mode minus
    without, per call, over ``calls`` ``addmm`` of 8x8 float32 tensors; median of 3 tries)."""
    x = torch.randn(8, 8)

    def loop() -> None:
        for _ in range(calls):
            torch.addmm(x, x, x)

    costs = []
    with torch.inference_mode():
        loop()
        for _ in range(3):
            plain, timer = _timed(loop), OpTimer()
            observed = _timed(loop, timer)
            costs.append(((observed[0] - plain[0]) / calls, (observed[1] - plain[1]) / calls))
    wall, cpu = sorted(c[0] for c in costs)[1], sorted(c[1] for c in costs)[1]
    return max(0.0, wall), max(0.0, cpu)


def non_torch_time(
    work: Callable[[], Any], *, sync: Callable[[], None] = lambda: None, repeats: int = 3
) -> dict[str, float]:
    """Time outside torch ops of one call of ``work`` (see the module docstring), on two clocks: this thread's CPU
    time (the figure: a loaded machine's preemptions do not count) and wall time.

    ``work`` runs ``2 * repeats`` times, without then with the mode, and should be warm; the least of each
    quantity is kept (a shared machine only adds time). ``sync`` (e.g. ``torch.cuda.synchronize``) runs before
    each timed call, not inside it: waiting for the device at the end is not host work (a blocking copy inside
    ``work`` is an op, counted in ``O``). Returns seconds: ``non_torch_s`` (CPU ``W - O - n*c``),
    ``non_torch_s_lower`` (CPU ``W0 - O``), ``non_torch_wall_s`` and ``non_torch_wall_s_lower`` (the same on
    wall time), ``op_cpu_s`` and ``op_s`` (``O``), ``cpu_s`` and ``wall_s`` (``W0``); ``ops`` (``n``) and
    ``mode_cost_us_per_op`` (``c``: CPU, wall)."""
    cost = mode_cost_per_op()
    inf = float("inf")
    plain, outside, inside, ops = [inf, inf], [inf, inf], [inf, inf], 0
    for _ in range(repeats):
        sync()
        once = _timed(work)
        sync()
        timer = OpTimer()
        observed = _timed(work, timer)
        sync()
        ops = timer.ops
        for k, op in enumerate((timer.op_s, timer.op_cpu_s)):
            plain[k] = min(plain[k], once[k])
            outside[k] = min(outside[k], observed[k] - op)
            inside[k] = min(inside[k], op)
    return {
        "non_torch_s": outside[1] - ops * cost[1],
        "non_torch_s_lower": plain[1] - inside[1],
        "non_torch_wall_s": outside[0] - ops * cost[0],
        "non_torch_wall_s_lower": plain[0] - inside[0],
        "op_cpu_s": inside[1],
        "op_s": inside[0],
        "cpu_s": plain[1],
        "wall_s": plain[0],
        "ops": ops,
        "mode_cost_us_per_op": [1e6 * cost[1], 1e6 * cost[0]],
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
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))  # -1: never trim
