"""The GPU stage's parts under ``torch.compile``, each one graph of fixed shapes, with its compiles counted and timed.

``engine.compile`` (:class:`ovseg_mine.config.EngineConfig`) picks the mode:

* ``off``: the parts run as written (eager);
* ``default``: ``torch.compile(fn, fullgraph=True, dynamic=False)`` with TorchInductor, on any device (C++/OpenMP
  kernels on a CPU, Triton on a GPU). ``fullgraph=True``: a graph break is an error at the first call, not a
  silent split; ``dynamic=False``: every input shape gets its own specialised graph, so the callers keep the
  shapes few (below);
* ``reduce-overhead``: the same, plus CUDA graphs (``torch.compile(mode="reduce-overhead")``) on a GPU. CUDA graphs
  reuse their output memory on the next call of any CUDA-graphed function (a new "iteration" starts at each call:
  ``torch.compiler.cudagraph_mark_step_begin``), so the outputs are cloned before they are returned. On a device
  other than CUDA it runs as ``default``, with one notice per process.

The parts, and how many graphs each compiles in a run (its bound; a new input shape is a new graph):

=================  ============================================================  ==================================
part               what its inputs are padded to                                 graphs per run
=================  ============================================================  ==================================
``sam_encoder``    ``[encoder_batch_size, 3, S, S]`` (short batches get zero      1
                   images: :meth:`~ovseg_mine.mine.algorithms.sam_batch.BatchedSam.embed`)
``sam_decoder``    one image's features ``[1, C, h, w]`` and                      1
                   ``[min(points_per_batch, grid points), 2, C]`` prompts (the
                   last batch of an image padded with zero prompts, outputs
                   dropped: :meth:`~ovseg_mine.mine.algorithms.sam_batch.BatchedSam.decode`)
``clip_image``     ``[n, 3, S, S]`` crops per ``encode_image`` call               distinct call sizes: 1 pooled
                                                                                 (``clip.batch_size``); per image,
                                                                                 one per crop-count bucket
=================  ============================================================  ==================================

(Per-image CLIP calls unpadded, as ``encode_crops(pad=False)`` makes them, compile once per distinct crop count
until their sizes are bucketed.) Selection and crop chunk bodies take a name here when they are fixed-shape
functions (one line each: ``parts.wrap("select_chunk", fn)``).

Counting: a compile is a graph Dynamo hands to the backend. The count is the change of Dynamo's own graph counter
(``torch._dynamo.utils.counters["stats"]["unique_graphs"]``, incremented once per compiled graph) across one call
of the part; the parts run one at a time on one thread, so the change belongs to that part. This counts every
recompile whatever guard failed (a new shape, a new dtype, a changed global), which a count of distinct input
shapes made by the wrapper would miss. The seconds are the wall time of the calls that compiled (Dynamo's
tracing, Inductor's code generation and C++/Triton compiles, and that call's own run, queued on a GPU).

Dynamo caches graphs per code object, for the whole process: a second engine in one process reuses the first
one's graphs when its guards pass (counted 0). A code object compiled ``torch._dynamo.config.recompile_limit``
(8) times raises under ``fullgraph=True`` at its next new shape; a part then runs that call eagerly (the same
result up to rounding), warns once and counts it (``eager_calls``): a part over its bound is a bucketing bug to
fix, not a reason to fail an image.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

log = logging.getLogger("ovseg_mine")

#: The modes of ``engine.compile``.
MODES = ("off", "default", "reduce-overhead")

#: Whether this process has told that ``reduce-overhead`` runs as ``default`` off CUDA (told once).
_fallback_told = False


def effective_mode(mode: str, device: "torch.device | str") -> str:
    """The mode a part compiles with on ``device``: ``reduce-overhead`` becomes ``default`` off CUDA, logged once per
    process (a warning on the ``ovseg_mine`` logger).

    Raises:
        ValueError: ``mode`` not in :data:`MODES`.
    """
    import torch

    global _fallback_told
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "reduce-overhead" and torch.device(device).type != "cuda":
        if not _fallback_told:
            _fallback_told = True
            log.warning(
                "engine.compile='reduce-overhead' needs CUDA graphs; on %s it runs as 'default' (TorchInductor)",
                torch.device(device).type,
            )
        return "default"
    return mode


@dataclass
class PartStats:
    """What compiling one part cost so far.

    Attributes:
        mode: the mode it compiles with (after the fallback of :func:`effective_mode`).
        compiles: graphs compiled (the first one included; 0 when ``off`` or when every call hit Dynamo's cache).
        seconds: wall seconds of the calls that compiled.
        calls: calls so far.
        eager_calls: calls run eagerly because Dynamo's recompile limit was reached (see the module docstring).
    """

    mode: str
    compiles: int = 0
    seconds: float = 0.0
    calls: int = 0
    eager_calls: int = 0


class CompiledPart:
    """A function or module compiled as one graph (see the module docstring), callable as the original.

    Args:
        name: the part's name in logs and :meth:`CompiledParts.stats`.
        fn: a function or ``torch.nn.Module`` whose body Dynamo can capture whole.
        mode: ``default`` or ``reduce-overhead`` (already resolved by :func:`effective_mode`).
    """

    def __init__(self, name: str, fn: Callable[..., Any], mode: str) -> None:
        import torch

        self.name, self.fn = name, fn
        self.stats = PartStats(mode)
        self.compiled = torch.compile(fn, fullgraph=True, dynamic=False, mode=None if mode == "default" else mode)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch._dynamo.exc import FailOnRecompileLimitHit
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        self.stats.calls += 1
        try:
            out = self.compiled(*args, **kwargs)
        except FailOnRecompileLimitHit:
            if not self.stats.eager_calls:
                log.warning("%s: Dynamo's recompile limit reached; new input shapes run eagerly", self.name)
            self.stats.eager_calls += 1
            return self.fn(*args, **kwargs)
        new = counters["stats"]["unique_graphs"] - graphs
        if new:
            seconds = time.perf_counter() - start
            self.stats.compiles += new
            self.stats.seconds += seconds
            log.info(
                "compiled %s (%s) for inputs %s in %.1f s (%d graph(s) so far, %.1f s)",
                self.name,
                self.stats.mode,
                _shapes(args, kwargs),
                seconds,
                self.stats.compiles,
                self.stats.seconds,
            )
        if self.stats.mode == "reduce-overhead":  # the next CUDA-graph replay would overwrite these
            out = _clone(out)
        return out


class CompiledParts:
    """The compiled parts of one engine, and their compile counts and seconds.

    Args:
        mode: ``engine.compile`` (:data:`MODES`).
        device: where the parts run (``reduce-overhead`` needs CUDA).

    Raises:
        ValueError: ``mode`` not in :data:`MODES`.
    """

    def __init__(self, mode: str, device: "torch.device | str") -> None:
        self.mode = effective_mode(mode, device)
        self.parts: dict[str, CompiledPart] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` compiled as the part ``name`` (``fn`` itself when the mode is ``off``); a name already taken
        is replaced (its counts start again)."""
        if self.mode == "off":
            return fn
        self.parts[name] = CompiledPart(name, fn, self.mode)
        return self.parts[name]

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per part: ``{"mode", "compiles", "seconds", "calls", "eager_calls"}`` (:class:`PartStats`; empty when the
        mode is ``off``)."""
        return {name: dict(vars(part.stats)) for name, part in self.parts.items()}


def compile_part(name: str, fn: Callable[..., Any], mode: str, device: "torch.device | str") -> Callable[..., Any]:
    """One part compiled on its own: ``fn`` for ``off``, else a :class:`CompiledPart` (its counts in ``.stats``).

    Args:
        name: the part's name in logs.
        fn: a function or ``torch.nn.Module`` whose body Dynamo can capture whole.
        mode: ``engine.compile`` (:data:`MODES`).
        device: where it runs (``reduce-overhead`` needs CUDA; elsewhere it runs as ``default``, told once).

    Raises:
        ValueError: ``mode`` not in :data:`MODES`.
    """
    mode = effective_mode(mode, device)
    return fn if mode == "off" else CompiledPart(name, fn, mode)


def _shapes(args: tuple, kwargs: dict) -> str:
    """The tensor inputs' shapes and dtypes, for the compile log line."""
    import torch

    values = [*args, *kwargs.values()]
    return ", ".join(
        f"{list(v.shape)} {str(v.dtype).removeprefix('torch.')}" for v in values if isinstance(v, torch.Tensor)
    )


def _clone(out: Any) -> Any:
    """Tensors of ``out`` (a tensor, or tuples, lists and dicts of them) cloned; other values as they are."""
    import torch

    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(v) for v in out)
    if isinstance(out, dict):
        return {k: _clone(v) for k, v in out.items()}
    return out
