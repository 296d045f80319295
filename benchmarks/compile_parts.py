"""The engine's compiled parts, seen from a benchmark: where each part's callable lives on a ``MiningEngine``, its
inputs captured from a real run, its graph breaks (``torch._dynamo.explain``), and how often and how long each part
compiled in a run (``torch._dynamo.utils.get_compilation_metrics``).

Nothing here depends on how the engine applies ``engine.compile`` beyond the config value: a part is found by
its attribute path on the engine (:data:`PARTS`), unwrapped if it is a compiled wrapper (``_orig_mod``,
``_torchdynamo_orig_callable``, ``__wrapped__``), and a compilation is attributed to the part whose source file
holds the compiled frame's code (dynamo's resumed frames after a graph break keep their function's file).
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass(frozen=True)
class Part:
    """A compiled part of the engine: ``name`` and the attribute path of its callable on a ``MiningEngine``
    (e.g. ``"sam._encoder"``: ``engine.sam._encoder``)."""

    name: str
    path: str


#: The parts ``engine.compile`` compiles, by attribute path on the engine. EXTEND HERE when the engine gains a
#: compiled part (the selection and crop chunk bodies of issue 23 item 2); a path that does not resolve is reported
#: as absent, so entries for parts not written yet are harmless.
PARTS: list[Part] = [
    Part("sam_encoder", "sam._encoder"),  # BatchedSam.embed: the image encoder, [B, 3, S, S] -> [B, 256, S/16, S/16]
    Part("sam_decoder_step", "sam._decoder"),  # BatchedSam.decode: the mask decoder, one call per points_per_batch
    Part("clip_image_tower", "clip.encode_image"),  # matching.encode_crops: [clip.batch_size, 3, 224, 224] crops
    # Part("selection_chunk", "<attribute path of the selection chunk body>"),
    # Part("crop_chunk", "<attribute path of the crop chunk body>"),
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
        inner = inner or getattr(fn, "__wrapped__", None)
        if inner is None or inner is fn:
            return fn
        fn = inner
    return fn


def source_file(fn: Any) -> str | None:
    """The file of the code a call of ``fn`` runs first (a module's ``forward``, a method's function)."""
    import torch

    fn = unwrap(fn)
    target = type(fn).forward if isinstance(fn, torch.nn.Module) else getattr(fn, "__func__", fn)
    try:
        return inspect.getsourcefile(target)
    except TypeError:
        return None


@contextlib.contextmanager
def capture_inputs(engine: Any, parts: list[Part] = PARTS) -> Iterator[dict[str, tuple[tuple, dict]]]:
    """While the ``with`` block runs the engine, record each part's first call ``(args, kwargs)`` by part name
    (the tensors themselves, not copies); the engine's attributes are restored on exit."""
    captured: dict[str, tuple[tuple, dict]] = {}
    restore = []
    for part in parts:
        found = _owner_and_attr(engine, part.path)
        if found is None:
            continue
        owner, attr = found
        original, had_own = getattr(owner, attr), attr in vars(owner)

        def recorder(*args: Any, _name: str = part.name, _fn: Any = original, **kwargs: Any) -> Any:
            captured.setdefault(_name, (args, kwargs))
            return _fn(*args, **kwargs)

        setattr(owner, attr, recorder)  # an instance attribute: shadows a method, replaces a stored callable
        restore.append((owner, attr, original, had_own))
    try:
        yield captured
    finally:
        for owner, attr, original, had_own in restore:
            if had_own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)


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


def compilations(engine: Any, metrics: list[Any], parts: list[Part] = PARTS) -> dict[str, Any]:
    """dynamo's compilation records (``get_compilation_metrics()`` after a run) grouped by part: per part the
    frames compiled (``graphs``), ``recompiles`` (compilations of a frame already compiled once: a new shape or
    a failed guard), ``compile_s`` (dynamo + backend, ``entire_frame_compile_time_s``) and the failures; records
    of no known part are listed under ``other`` by function and file."""
    files = {part.name: source_file(fn) for part in parts if (fn := resolve(engine, part)) is not None}
    by_part: dict[str, list[Any]] = defaultdict(list)
    for m in metrics:
        name = next((n for n, f in files.items() if f and m.co_filename == f), "other")
        by_part[name].append(m)
    out: dict[str, Any] = {}
    for name in [*files, "other"]:
        records = by_part.get(name, [])
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
