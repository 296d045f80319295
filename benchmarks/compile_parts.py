"""The engine's compiled parts, seen from a benchmark: where each part's callable lives on a ``MiningEngine``, its
inputs captured from a real run, its graph breaks (``torch._dynamo.explain``), and how often and how long each part
compiled in a run (``torch._dynamo.utils.get_compilation_metrics``).

Nothing here depends on how the engine applies ``engine.compile`` beyond the config value: a part is found by
its attribute path on the engine (:data:`PARTS`), unwrapped for ``explain`` if it is a compiled wrapper
(``_orig_mod``, ``_torchdynamo_orig_callable``, ``__wrapped__``, a ``CompiledPart``'s ``fn``), and a compilation
belongs to the part during whose call dynamo made it (the part's attribute is wrapped for the run).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator


@dataclass(frozen=True)
class Part:
    """A compiled part of the engine: ``name`` and the attribute path of its callable on a ``MiningEngine``
    (e.g. ``"sam._encoder"``: ``engine.sam._encoder``)."""

    name: str
    path: str


#: The parts ``engine.compile`` compiles (the names of ``ovseg_mine.mine.algorithms.compiled``), by attribute path
#: on the engine; a path that does not resolve (e.g. a chunk body with stock kernels) is reported as absent.
PARTS: list[Part] = [
    Part("sam_encoder", "sam._encoder"),  # BatchedSam.embed: the image encoder, [B, 3, S, S] -> [B, 256, S/16, S/16]
    Part("sam_decoder", "sam._step"),  # BatchedSam.decode: one decoder call per points_per_batch (stock or fused)
    Part("clip_image", "clip.encode_image"),  # matching.encode_crops / encode_crops_pooled: a call of crops
    Part("select_chunk", "_select_chunk"),  # fused_amg.selection_chunk (fused kernels)
    Part("crop_chunk", "_crop_chunk"),  # crops.render_crops_from_logits (fused kernels)
]


def _owner_and_attr(engine: Any, path: str) -> tuple[Any, str] | None:
    *owners, attr = path.split(".")
    obj = engine
    for name in owners:
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return (obj, attr) if getattr(obj, attr, None) is not None else None


def resolve(engine: Any, part: Part) -> Any | None:
    """The part's callable on ``engine`` as the engine calls it (maybe compiled), or None when absent."""
    found = _owner_and_attr(engine, part.path)
    return None if found is None else getattr(*found)


def unwrap(fn: Any) -> Any:
    """The eager callable behind a ``torch.compile`` wrapper (an ``OptimizedModule``, a compiled function or a
    ``functools.wraps`` wrapper); ``fn`` itself when it is not one."""
    for _ in range(8):
        inner = getattr(fn, "_orig_mod", None) or getattr(fn, "_torchdynamo_orig_callable", None)
        inner = inner or getattr(fn, "__wrapped__", None) or getattr(fn, "fn", None)  # compiled.CompiledPart
        if inner is None or inner is fn:
            return fn
        fn = inner
    return fn


@contextlib.contextmanager
def _wrapped(engine: Any, parts: list[Part], wrap: Callable[[str, Any], Any]) -> Iterator[None]:
    """Replace each present part's callable on ``engine`` by ``wrap(name, callable)`` for the ``with`` block."""
    restore = []
    for part in parts:
        found = _owner_and_attr(engine, part.path)
        if found is None:
            continue
        owner, attr = found
        original, had_own = getattr(owner, attr), attr in vars(owner)
        setattr(owner, attr, wrap(part.name, original))  # an instance attribute: shadows a method
        restore.append((owner, attr, original, had_own))
    try:
        yield
    finally:
        for owner, attr, original, had_own in restore:
            if had_own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)


@contextlib.contextmanager
def capture_inputs(engine: Any, parts: list[Part] = PARTS) -> Iterator[dict[str, tuple[tuple, dict]]]:
    """While the ``with`` block runs the engine, record each part's first call ``(args, kwargs)`` by part name
    (the tensors themselves, not copies); the engine's attributes are restored on exit."""
    captured: dict[str, tuple[tuple, dict]] = {}

    def wrap(name: str, fn: Any) -> Any:
        def recorder(*args: Any, **kwargs: Any) -> Any:
            captured.setdefault(name, (args, kwargs))
            return fn(*args, **kwargs)

        return recorder

    with _wrapped(engine, parts, wrap):
        yield captured


@contextlib.contextmanager
def attribute_compilations(engine: Any, parts: list[Part] = PARTS) -> Iterator[dict[str, list[Any]]]:
    """While the ``with`` block runs the engine, give each compilation record dynamo makes
    (``get_compilation_metrics``) to the part during whose call it was made; records made outside every part's
    calls go under ``other`` when the block ends. Yields ``{name: [CompilationMetrics, ...]}``. Attribution by
    call, not by code, so it holds whatever wrapper the engine compiles a part through."""
    from torch._dynamo.utils import get_compilation_metrics, set_compilation_metrics_limit

    set_compilation_metrics_limit(100_000)  # the default keeps 64: counts by position need them all
    start = len(get_compilation_metrics())
    owned: dict[str, list[Any]] = defaultdict(list)
    claimed: set[int] = set()

    def wrap(name: str, fn: Any) -> Any:
        def attributed(*args: Any, **kwargs: Any) -> Any:
            before = len(get_compilation_metrics())
            try:
                return fn(*args, **kwargs)
            finally:
                new = [m for m in get_compilation_metrics()[before:] if id(m) not in claimed]
                claimed.update(id(m) for m in new)
                owned[name].extend(new)

        return attributed

    with _wrapped(engine, parts, wrap):
        for part in parts:
            owned.setdefault(part.name, [])
        yield owned
    owned["other"] = [m for m in get_compilation_metrics()[start:] if id(m) not in claimed]


def graph_breaks(engine: Any, inputs: dict[str, tuple[tuple, dict]], parts: list[Part] = PARTS) -> dict[str, Any]:
    """``torch._dynamo.explain`` of each part's eager callable on its captured inputs, under inference mode (as
    the engine calls them): ``{name: {graphs, graph_breaks, ops, break_reasons}}``, ``{"absent": ...}`` for a part
    the engine does not have, ``{"not_called": ...}`` for one the run did not call, ``{"error": ...}`` when
    dynamo fails. Resets dynamo's caches before each part."""
    import torch

    out: dict[str, Any] = {}
    for part in parts:
        fn = resolve(engine, part)
        if fn is None:
            out[part.name] = {"absent": f"engine.{part.path} does not exist"}
            continue
        if part.name not in inputs:
            out[part.name] = {"not_called": "the run did not call it"}
            continue
        args, kwargs = inputs[part.name]
        torch._dynamo.reset()
        try:
            with torch.inference_mode():
                explained = torch._dynamo.explain(unwrap(fn))(*args, **kwargs)
        except Exception as exc:  # report, go on with the other parts
            out[part.name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        out[part.name] = {
            "graphs": explained.graph_count,
            "graph_breaks": explained.graph_break_count,
            "ops": explained.op_count,
            "break_reasons": [
                {"reason": str(r.reason)[:300], "where": [f"{f.filename}:{f.lineno}" for f in r.user_stack[-2:]]}
                for r in explained.break_reasons
            ],
        }
    torch._dynamo.reset()
    return out


def summarize(owned: dict[str, list[Any]]) -> dict[str, Any]:
    """Per part of :func:`attribute_compilations`'s records: the frames compiled (``graphs``), ``recompiles``
    (compilations of a frame already compiled once: a new shape or a failed guard), ``compile_s`` (dynamo +
    backend, ``entire_frame_compile_time_s``) and the failures; ``other`` (if any) also lists its frames."""
    out: dict[str, Any] = {}
    for name, records in owned.items():
        if name == "other" and not records:
            continue
        frames = [(m.co_filename, m.co_firstlineno, m.co_name) for m in records]
        out[name] = {
            "graphs": len(records),
            "recompiles": len(frames) - len(set(frames)),
            "compile_s": round(sum(m.entire_frame_compile_time_s or 0.0 for m in records), 3),
            "failures": [str(m.fail_reason)[:300] for m in records if m.fail_reason],
        }
        if name == "other":
            out[name]["frames"] = sorted({f"{n} ({f}:{line})" for f, line, n in frames})
    return out


def compilation_metrics() -> list[Any]:
    """dynamo's compilation records so far in this process (clear them with :func:`clear_compilation_metrics`)."""
    from torch._dynamo.utils import get_compilation_metrics

    return list(get_compilation_metrics())


def clear_compilation_metrics() -> None:
    """Forget dynamo's compiled code and its compilation records: the next compiled run starts cold."""
    import torch
    from torch._dynamo.utils import clear_compilation_metrics as clear

    torch._dynamo.reset()
    clear()
