"""The GPU check (issue 12, item 6): one script, a few minutes on one GPU, that measures the GPU stage of mining and
writes ``benchmarks/results/gpu.json``.

    python benchmarks/gpu_check.py                       # on the GPU machine (see benchmarks/README.md: wheels)
    python benchmarks/gpu_check.py --images 2            # anywhere: on a CPU it runs small and says what it skipped
    python benchmarks/gpu_check.py --device cpu --out /tmp/gpu.json   # dry run, tiny models, every part (1-3 min)

It runs the stages after nouns in this process, without Ray and without spaCy (nouns of the bundled sample come
from ``benchmarks/data/coco_sample_nouns.json``), on the bundled 16 COCO images repeated under new ids, with SAM
``vit_b`` and CLIP ``ViT-B-16`` random weights (SAM calibrated: ``calibration.py``) at the ``coco-ovseg``
settings (32x32 points, 100 masks per image, bf16) and the GPU stage's batch settings. ``--device cpu`` is a dry run
on a CPU (CUDA hidden) with the test suite's tiny random models (``harness.TINY_MODELS``) in fp32, 4x4 points and
2 images: every part runs, compiled ones included (TorchInductor), in 1-3 minutes on 2 cores (most of it the first
compilation of the parts); ``tests/common/test_gpu_check.py`` runs it. Parts, each recorded (or its error) in
the JSON as soon as it ends, so a run cut short keeps what it measured:

1. ``environment``: Python, torch, device; the modules it needs and which are missing (then it stops there);
2. ``throughput``: images/s of the GPU stage alone (eager, ``engine.compile='off'``) and end to end in-process
   (decode threads overlapping the GPU stage, then finalize), seconds per step, peak GPU memory;
3. ``compile_default`` and ``compile_reduce_overhead`` (unless ``--no-compile``): the same throughput with
   ``engine.compile`` = ``'default'`` and ``'reduce-overhead'`` (CUDA graphs; the engine falls back to
   ``'default'`` on a CPU), each in a fresh engine after dynamo's caches are cleared: images/s, pairs identical
   to the eager run's, compile seconds (dynamo's records, and the warm-up call's wall time), graphs compiled and
   recompiles, in all and per part (``compile_parts.py``);
4. ``proxies``: host syncs per image (``torch.cuda.set_sync_debug_mode``, and the CPU counters of ``proxies.py``),
   aten ops and CUDA kernels per image, time outside torch ops (under the profiler, and without it:
   ``host_time.py``);
5. ``memory_64mp``: peak GPU memory for a batch of 64 MP images at the default batch size (must stay <= 16 GiB);
6. ``agreement``: the hand-written baseline (``reference.py``: stock AMG fp32, one CLIP call per crop) on a few
   images, against ovseg-mine in bf16 and in fp32: pairs identical, speed-up.

Everything not run (no GPU, time budget, a missing module) is listed under ``not_run`` with the reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

#: Modules the check imports, and the PyPI distribution that brings each.
REQUIRED = {
    "torch": "torch",
    "torchvision": "torchvision",
    "numpy": "numpy",
    "PIL": "pillow",
    "pyarrow": "pyarrow",
    "pydantic": "pydantic (+ pydantic-core, annotated-types, typing-inspection)",
    "open_clip": "open_clip_torch (+ ftfy, wcwidth, regex, huggingface_hub, safetensors)",
    "segment_anything": "segment-anything",
    "pycocotools": "pycocotools",
}
#: Modules mining uses elsewhere that the check does without.
NOT_NEEDED = {
    "ray": "Ray (the check runs the GPU stage in this process; the Ray pipeline is measured on CPU by "
    "mine_benchmark.py ray)",
    "spacy": "spaCy (nouns come from benchmarks/data/coco_sample_nouns.json)",
}
GPU_SETTINGS = ["sam.points_per_batch=512", "engine.batching='pooled'"]
#: The parts after ``load``, in the order they run.
PARTS = ["throughput", "compile_default", "compile_reduce_overhead", "proxies", "memory_64mp", "agreement"]


def environment() -> tuple[dict[str, Any], list[str]]:
    missing = [f"{module} (pip: {dist})" for module, dist in REQUIRED.items() if not importlib.util.find_spec(module)]
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "modules_missing": missing,
        "modules_absent_not_needed": [
            why for module, why in NOT_NEEDED.items() if not importlib.util.find_spec(module)
        ],
    }
    if importlib.util.find_spec("torch"):
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.cuda.is_available()
        if env["cuda"]:
            props = torch.cuda.get_device_properties(0)
            env["device"] = props.name
            env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
    return env, missing


class Check:
    """Runs the parts, records each one's result or error in the report, and writes the JSON after each."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.budget_s, self.start = out, budget_s, time.perf_counter()
        self.report: dict[str, Any] = {"status": "running", "not_run": {}, "errors": {}}

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.report, indent=1, default=str) + "\n")

    def skip(self, part: str, reason: str) -> None:
        self.report["not_run"][part] = reason
        print(f"[{part}] not run: {reason}", flush=True)
        self.write()

    def part(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` unless the budget is spent. It returns a dict (recorded under ``name``) or a pair (a dict
        to record, a value to hand back); returns that value (or the dict), None when skipped or failed."""
        elapsed = time.perf_counter() - self.start
        if elapsed > self.budget_s:
            self.skip(name, f"time budget spent ({elapsed:.0f} s of {self.budget_s:.0f} s)")
            return None
        print(f"[{name}] ...", flush=True)
        begin = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # record and go on: the other parts still measure something
            self.report["errors"][name] = {
                "error": f"{type(exc).__name__}: {exc}"[:500],
                "traceback": traceback.format_exc()[-3000:],
            }
            print(f"[{name}] failed: {type(exc).__name__}: {exc}", flush=True)
            self.write()
            return None
        summary, value = result if isinstance(result, tuple) else (result, result)
        summary["part_s"] = round(time.perf_counter() - begin, 1)
        self.report[name] = summary
        print(f"[{name}] {json.dumps(summary, default=str)[:1500]}", flush=True)
        self.write()
        return value


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _batches(rows: list, size: int) -> list[list]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def throughput(runner: Any, rows: list[dict], batch: int, workers: int) -> tuple[dict[str, Any], list[dict]]:
    """GPU stage alone, then decode threads overlapping the GPU stage and finalize (in-process end to end)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from ovseg_mine.mine.graph.stages import finalize_stage

    batches = _batches(rows, batch)
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        decoded = list(pool.map(runner.decode, batches))
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    runner.stage(decoded[0])  # warm-up: kernels (compilation), the noun cache of these images
    _sync()
    warmup_s = time.perf_counter() - start
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for table in decoded:
        runner.stage(table)
    _sync()
    gpu_s = time.perf_counter() - start
    results: list[dict] = []
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for table in list(pool.map(runner.decode, batches)):
            results += finalize_stage(runner.stage(table)).to_pylist()
    _sync()
    e2e_s = time.perf_counter() - start
    n = len(rows)
    return {
        "images": n,
        "batch": batch,
        "decode_threads": workers,
        "warmup_batch_s": warmup_s,
        "gpu_stage_images_per_s": n / gpu_s,
        "end_to_end_images_per_s": n / e2e_s,
        "decode_images_per_s_all_threads": n / decode_s,
        "step_seconds_per_image": {
            step: float(np.mean([r[f"{step}_s"] for r in results])) for step in ("decode", "proposals", "crops", "clip")
        },
        "masks_per_image": float(np.mean([r["num_proposals"] for r in results])),
        "pairs_per_image": float(np.mean([len(r["pairs"]) for r in results])),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "statuses": {s: sum(r["status"] == s for r in results) for s in {r["status"] for r in results}},
    }, results


def compiled(cfg: Any, mode: str, rows: list[dict], eager: list[dict], batch: int, workers: int) -> dict[str, Any]:
    """:func:`throughput` of a fresh engine with ``engine.compile=mode`` after dynamo's caches are cleared, with
    its pairs compared to the eager run's (``eager``: :func:`throughput`'s result rows) and dynamo's compilations
    of the run (graphs, recompiles, compile seconds; in all and per part, ``compile_parts.py``)."""
    import torch
    from compile_parts import attribute_compilations, clear_compilation_metrics, summarize
    from harness import StageRunner
    from mine_benchmark import agreement

    clear_compilation_metrics()
    runner = StageRunner(cfg)
    with attribute_compilations(runner.engine) as owned:
        summary, results = throughput(runner, rows, batch, workers)
    records = [m for part in owned.values() for m in part]
    per_part = summarize(owned)
    by_id = {r["image_id"]: r["pairs"] for r in results}
    same = agreement([r["pairs"] for r in eager], [by_id[r["image_id"]] for r in eager])
    cuda = torch.cuda.is_available()
    summary.update(
        {
            "mode": mode,
            "cuda_graphs": cuda and mode == "reduce-overhead",
            "images_per_s": summary["gpu_stage_images_per_s"],
            "pairs_compared": same["pairs"],
            "pairs_identical_vs_eager": same["pairs_identical"],
            "differences_vs_eager": same["difference_list"][:20],
            "similarity_abs_diff_max_vs_eager": same["similarity_abs_diff_max"],
            "compile_s": round(sum(m.entire_frame_compile_time_s or 0.0 for m in records), 3),
            "graphs_compiled": len(records),
            "recompiles": sum(part["recompiles"] for part in per_part.values()),
            "by_part": per_part,
        }
    )
    if not records:
        summary["note"] = "dynamo compiled nothing: the engine did not apply engine.compile on this device"
    return summary


def proxies(runner: Any, rows: list[dict]) -> dict[str, Any]:
    """Syncs, ops, kernels and non-torch time per image of one GPU-stage batch."""
    import warnings

    import torch
    from host_time import non_torch_time
    from proxies import count, profile_time

    decoded = runner.decode(rows)
    runner.stage(decoded)
    n = len(rows)
    counted = count(lambda: runner.stage(decoded))
    out: dict[str, Any] = {
        "images": n,
        "syncs_per_image_counted": counted["syncs"] / n,
        "syncs_by_kind": counted["syncs_by_kind"],
        "syncs_by_site": counted["syncs_by_site"],
        "aten_ops_per_image": counted["aten_ops"] / n,
        "aten_ops_per_image_excluding_views": counted["aten_ops_excluding_views"] / n,
    }
    timing = profile_time(lambda: runner.stage(decoded))
    out["non_torch_ms_per_image"] = 1000 * timing["non_torch_s"] / n
    out["non_torch_ms_per_image_between_ops"] = 1000 * timing["non_torch_between_ops_s"] / n
    out["non_torch_ms_per_image_around_ops"] = 1000 * timing["non_torch_around_ops_s"] / n
    host = non_torch_time(lambda: runner.stage(decoded), sync=_sync)
    out["non_torch_ms_per_image_unprofiled"] = 1000 * host["non_torch_s"] / n
    out["non_torch_ms_per_image_unprofiled_lower"] = 1000 * host["non_torch_s_lower"] / n
    out["non_torch_unprofiled"] = host
    if torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile

        _sync()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                runner.stage(decoded)
                _sync()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out["syncs_per_image"] = sum("synchroniz" in str(w.message) for w in caught) / n
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            runner.stage(decoded)
            _sync()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        out["cuda_kernels_per_image"] = len(kernels) / n
    return out


def memory_64mp(runner: Any, batch: int, nouns: list[str]) -> dict[str, Any]:
    """Peak GPU memory of a default-size batch of 64 MP images (a sample image upscaled)."""
    import torch
    from harness import SAMPLE
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        source = sorted((SAMPLE / "images").glob("*.jpg"))[0]
        big = Path(tmp) / "big.jpg"
        Image.open(source).convert("RGB").resize((9216, 6912), Image.BICUBIC).save(big, quality=90)
        rows = [
            {
                "image_id": i,
                "file_name": big.name,
                "path": str(big),
                "width": 9216,
                "height": 6912,
                "captions": ["a photo"],
                "nouns": nouns,
                "noun_caption_index": [0] * len(nouns),
                "nouns_s": 0.0,
            }
            for i in range(batch)
        ]
        decoded = runner.decode(rows)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = runner.stage(decoded).to_pylist()
        _sync()
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {
        "images": batch,
        "pixels_per_image": 9216 * 6912,
        "peak_gpu_gib": peak,
        "within_16_gib": peak <= 16,
        "seconds": seconds,
        "statuses": [r["status"] for r in out],
        "reasons": sorted({r["reason"] for r in out if r["reason"]}),
    }


def agreement(ckpt: str, rows: list[dict], ours: list[dict], runner32: Any, cfg: Any) -> dict[str, Any]:
    """The baseline against ovseg-mine bf16 (the throughput run's pairs) and fp32, on ``rows``."""
    from mine_benchmark import agreement as compare
    from reference import ReferenceMiner

    from ovseg_mine.models import clip_input_size, clip_mean_std, load_clip, load_sam

    device = runner32.engine.device
    sam, _ = load_sam(cfg.sam.model_type, ckpt, device=device)
    clip, tokenizer, _ = load_clip(cfg.clip.arch, "random", device=device, seed=cfg.seed)
    ref = ReferenceMiner(cfg, sam, clip, tokenizer, None, clip_input_size(clip), *clip_mean_std(clip))
    ref_pairs, ref_s = [], 0.0
    with tempfile.TemporaryFile("w+") as sink:
        ref.mine(rows[0], sink)  # warm-up
        for row in rows:
            _sync()
            start = time.perf_counter()
            pairs, _, _ = ref.mine(row, sink)
            _sync()
            ref_s += time.perf_counter() - start
            ref_pairs.append(pairs)
    by_id = {r["image_id"]: r["pairs"] for r in ours}
    runner32.run(rows[:1])
    start = time.perf_counter()
    fp32, _ = runner32.run(rows)
    fp32_s = time.perf_counter() - start
    return {
        "images": len(rows),
        "reference_s_per_image": ref_s / len(rows),
        "ours_fp32_s_per_image": fp32_s / len(rows),
        "bf16_vs_reference": compare(ref_pairs, [by_id[r["image_id"]] for r in rows]),
        "fp32_vs_reference": compare(ref_pairs, [r["pairs"] for r in fp32]),
    }


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=["auto", "cuda", "cpu"], default="auto", help="cpu: dry run with tiny models (CUDA hidden)"
    )
    parser.add_argument("--models", choices=["real", "tiny"], default=None, help="default: tiny with --device cpu")
    parser.add_argument("--images", type=int, default=None, help="images timed (default 64 on a GPU, 2 on a CPU)")
    parser.add_argument("--points-per-side", type=int, default=None, help="default 32 on a GPU, 8 on a CPU, 4 tiny")
    parser.add_argument("--batch", type=int, default=None, help="images per GPU-stage call (8; 2 with tiny models)")
    parser.add_argument("--reference-images", type=int, default=None, help="default 8 on a GPU, 1 on a CPU")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="measure engine.compile's modes"
    )
    parser.add_argument(
        "--budget-s", type=float, default=None, help="skip parts that would start after this (480 s; CPU: 3600 s)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _arguments(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    tiny = (args.models or ("tiny" if args.device == "cpu" else "real")) == "tiny"

    env, missing = environment()
    cuda = bool(env.get("cuda"))
    check = Check(args.out, args.budget_s or (480.0 if cuda else 3600.0))
    check.report["environment"] = env
    if args.device == "cuda" and not cuda and not missing:
        missing = ["a CUDA device (--device cuda)"]
    if missing:
        check.report["status"] = "missing modules"
        for part in PARTS:
            check.skip(part, "missing: " + ", ".join(missing))
        return check.report
    from calibration import calibrated_checkpoint
    from harness import (
        SAMPLE_NOUNS,
        TINY_MODELS,
        StageRunner,
        bench_config,
        load_nouns_json,
        sample_records,
        with_nouns,
    )

    n = args.images or (64 if cuda else 2)
    points = args.points_per_side or (4 if tiny else 32 if cuda else 8)
    batch = args.batch or (2 if tiny else 8)
    if not cuda:
        check.report["note"] = "no CUDA device: small CPU run (plumbing only); GPU figures are not measured"
    tmp = tempfile.TemporaryDirectory()
    model_type = "tiny" if tiny else "vit_b"
    ckpt = calibrated_checkpoint(model_type, str(Path(tmp.name) / f"sam_{model_type}_calibrated.pth"))
    extra = [*GPU_SETTINGS, f"ray.batch_size={batch}", f"sam.encoder_batch_size={batch}"]
    if not cuda:
        extra.append("clip.batch_size=32")  # a CPU run only checks the plumbing: small padded CLIP calls
        extra.append("engine.kernels='fused'")  # the path a GPU takes (auto: fused there), chunk bodies included
    if tiny:
        extra += TINY_MODELS
    precision = "fp32" if tiny else "bf16"  # the dry run's pairs must not depend on the CPU's bf16 support
    cfg = bench_config(points, precision, ckpt, [*extra, "engine.compile='off'"])
    check.report["settings"] = dict(images=n, points_per_side=points, batch=batch, precision=precision, overrides=extra)
    rows = with_nouns(sample_records(n), load_nouns_json(SAMPLE_NOUNS))
    runner = check.part("load", lambda: ({}, StageRunner(cfg)))
    if runner is None:
        return check.report
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    ours = check.part("throughput", lambda: throughput(runner, rows, batch, workers)) or []
    for mode in ("default", "reduce-overhead"):
        part = "compile_" + mode.replace("-", "_")
        if not args.compile:
            check.skip(part, "not asked (--no-compile)")
        elif not ours:
            check.skip(part, "no eager throughput results to compare with")
        else:
            cfgc = bench_config(points, precision, ckpt, [*extra, f"engine.compile={mode!r}"])
            check.part(part, lambda cfgc=cfgc, mode=mode: compiled(cfgc, mode, rows, ours, batch, workers))
    check.part("proxies", lambda: proxies(runner, rows[:batch]))
    if cuda:
        check.part("memory_64mp", lambda: memory_64mp(runner, batch, rows[0]["nouns"]))
    else:
        check.skip("memory_64mp", "no CUDA device (the CPU bound is measured by mine_benchmark.py big-image)")
    k = args.reference_images or (8 if cuda else 1)
    cfg32 = bench_config(points, "fp32", ckpt, [*extra, "engine.compile='off'"])
    if ours:
        check.part("agreement", lambda: agreement(ckpt, rows[:k], ours, StageRunner(cfg32), cfg32))
    else:
        check.skip("agreement", "no throughput results to compare")
    check.report["status"] = "complete" if not (check.report["errors"] or check.report["not_run"]) else "partial"
    check.report["seconds"] = round(time.perf_counter() - check.start, 1)
    check.write()
    print(f"\nJSON: {args.out} ({check.report['status']}; not run: {sorted(check.report['not_run'])})")
    return check.report


if __name__ == "__main__":
    main()
