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

The parts, what their inputs are padded to, and how many graphs each compiles in a run (its bound; a new input
shape is a new graph):

* ``sam_encoder``: ``[encoder_batch_size, 3, S, S]`` (short batches get zero images:
  :meth:`~ovseg_mine.mine.algorithms.sam_batch.BatchedSam.embed`). 1 graph.
* ``sam_decoder``: one image's features ``[1, C, h, w]`` (or the fused decoder's per-image context) and
  ``[min(points_per_batch, grid points), 2, C]`` prompts (the last batch of an image padded with zero prompts, its
  outputs dropped: :meth:`~ovseg_mine.mine.algorithms.sam_batch.BatchedSam.decode`). 1 graph.
* ``clip_image``: ``[n, 3, S, S]`` crops per ``encode_image`` call. Pooled: one graph per call size of
  :func:`~ovseg_mine.mine.algorithms.matching.pooled_calls` (``clip.batch_size`` halved down to 32: 4 at 256).
  Per image (a CPU's default), unpadded: one per distinct crop count, up to Dynamo's limit (below).
* ``select_chunk`` (fused kernels): ``[C, h, w]`` candidates' logits with ``C`` a power of two, the last chunk
  padded (:func:`~ovseg_mine.mine.algorithms.fused_amg.select_masks_fused`); the image size (the first dimension
  of the ``[H, h]`` and ``[W, w]`` upsampling matrices) is a dynamic dimension. One graph per chunk size ``C`` (a
  few powers of two), plus at most one when Dynamo first turns the size dynamic.
* ``crop_chunk`` (fused kernels): a fixed number of masks per chunk for the run, the last chunk padded
  (:meth:`~ovseg_mine.mine.algorithms.engine.MiningEngine._fused_crops`); the image's ``H``, ``W`` and the matrices'
  first dimensions dynamic. 1-2 graphs.

The two chunk bodies take the image size as a dynamic dimension rather than a padded one: padded rows of the
upsampling matrices would give logits of 0, which the stability score's ``> -1`` count would take in.

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
        buckets: distinct input signatures seen (tensor arguments' shapes, the dynamic dimensions left out, and
            dtypes): the graphs the part should need; more compiles than this means guards other than shapes
            failed, or dynamic dimensions were specialised.
    """

    mode: str
    compiles: int = 0
    seconds: float = 0.0
    calls: int = 0
    eager_calls: int = 0
    buckets: int = 0


class CompiledPart:
    """A function or module compiled as one graph (see the module docstring), callable as the original.

    Args:
        name: the part's name in logs and :meth:`CompiledParts.stats`.
        fn: a function or ``torch.nn.Module`` whose body Dynamo can capture whole.
        mode: ``default`` or ``reduce-overhead`` (already resolved by :func:`effective_mode`).
        dynamic: positional argument index -> its dimensions that vary with the image size (e.g. ``{1: (0,)}``):
            those are marked dynamic before each call (``torch._dynamo.maybe_mark_dynamic``), so one graph serves
            every image size; None: every shape static (``dynamic=False``).
        options: Inductor settings for this part (``torch.compile``'s ``options``, merged over the mode's own).
    """

    def __init__(
        self,
        name: str,
        fn: Callable[..., Any],
        mode: str,
        dynamic: dict[int, tuple[int, ...]] | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        import torch

        self.name, self.fn, self.dynamic = name, fn, dynamic or {}
        self.stats = PartStats(mode)
        self._signatures: set[tuple] = set()
        dyn = None if self.dynamic else False
        if options:  # torch.compile takes a mode or options, not both: the mode's options, then these
            from torch._inductor import list_mode_options

            merged = (list_mode_options(mode, dyn) if mode != "default" else {}) | options
            self.compiled = torch.compile(fn, fullgraph=True, dynamic=dyn, options=merged)
        else:
            self.compiled = torch.compile(fn, fullgraph=True, dynamic=dyn, mode=None if mode == "default" else mode)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch._dynamo import maybe_mark_dynamic
        from torch._dynamo.exc import FailOnRecompileLimitHit
        from torch._dynamo.utils import counters

        for index, dims in self.dynamic.items():
            for dim in dims:
                maybe_mark_dynamic(args[index], dim)
        self._signatures.add(_signature(args, kwargs, self.dynamic))
        self.stats.buckets = len(self._signatures)
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

    def wrap(
        self,
        name: str,
        fn: Callable[..., Any],
        dynamic: dict[int, tuple[int, ...]] | None = None,
        options: dict[str, Any] | None = None,
    ) -> Callable[..., Any]:
        """``fn`` compiled as the part ``name`` (``fn`` itself when the mode is ``off``); a name already taken
        is replaced (its counts start again). ``dynamic``, ``options``: as :class:`CompiledPart`'s."""
        if self.mode == "off":
            return fn
        self.parts[name] = CompiledPart(name, fn, self.mode, dynamic, options)
        return self.parts[name]

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per part: ``{"mode", "compiles", "seconds", "calls", "eager_calls", "buckets"}`` (:class:`PartStats`; empty
        when the mode is ``off``)."""
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


def _signature(args: tuple, kwargs: dict, dynamic: dict[int, tuple[int, ...]]) -> tuple:
    """The tensor arguments' shapes (dynamic dimensions as None) and dtypes, in order."""
    import torch

    values = [(i, v) for i, v in enumerate(args)] + [(k, v) for k, v in sorted(kwargs.items())]
    return tuple(
        (
            key,
            tuple(None if d in dynamic.get(key, ()) else n for d, n in enumerate(v.shape)),  # type: ignore[call-overload]
            v.dtype,
        )
        for key, v in values
        if isinstance(v, torch.Tensor)
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
