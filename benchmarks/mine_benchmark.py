"""Mining speed and cost, measured: ovseg-mine against the hand-written baseline, CPU proxies of GPU cost, the real
Ray pipeline end to end, noun extraction. Each part writes its section of one JSON file (``--out``).

    python benchmarks/mine_benchmark.py speed --images 2              # baseline vs ovseg-mine, agreement
    python benchmarks/mine_benchmark.py proxies --images 8            # syncs, aten ops, non-torch time per image
    python benchmarks/mine_benchmark.py proxies-compiled --records R.pkl  # compiled figures from a saved pass
    python benchmarks/mine_benchmark.py compile --images 2 [--tiny]   # eager vs compiled: pairs, breaks, recompiles
    python benchmarks/mine_benchmark.py ray --images 8                # the real Ray pipeline, end to end
    python benchmarks/mine_benchmark.py big-image --images 0          # host memory: COCO vs 64 MP images
    python benchmarks/mine_benchmark.py nouns                         # captions/s of the noun stage
    python benchmarks/mine_benchmark.py nouns-json --out benchmarks/data/coco_sample_nouns.json

Models: SAM ``vit_b`` and open_clip ``ViT-B-16`` with seeded random weights, SAM calibrated so that about 100 masks
per image pass the paper's filters (``calibration.py``). See benchmarks/README.md for what is measured and why.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calibration import calibrated_checkpoint  # noqa: E402
from harness import (  # noqa: E402
    COCO_MINI,
    TINY_MODELS,
    StageRunner,
    bench_config,
    coco_records,
    nouns_with_spacy,
    with_nouns,
)

from ovseg_mine import rle  # noqa: E402

#: What the GPU stage runs with on a GPU (``gpu_check.py`` uses the same); the proxies run it on the CPU.
GPU_SETTINGS = [
    "engine.device_rules='cuda'",
    "sam.points_per_batch=512",
    "engine.batching='pooled'",
]


def machine() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "loadavg": os.getloadavg(),
    }


class PeakRSS:
    """Peak resident set size of this process (sampled every 10 ms) while ``with`` blocks of one label run."""

    def __init__(self) -> None:
        self.peak: dict[str, int] = {}
        self.label: str | None = None
        self._page = os.sysconf("SC_PAGE_SIZE")
        threading.Thread(target=self._sample, daemon=True).start()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while True:
            time.sleep(0.01)
            if self.label is not None:
                self.peak[self.label] = max(self.peak.get(self.label, 0), self._rss())

    def track(self, label: str) -> "PeakRSS":
        self.label = label
        return self

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: Any) -> None:
        self.label = None


def agreement(ref_pairs: list[list[dict]], ours_pairs: list[list[dict]]) -> dict[str, Any]:
    """Pairs of two runs over the same images: identical (same noun, the same mask RLE), and for those the
    similarity difference; each differing pair with the baseline's margin (best minus runner-up similarity)."""
    same = total = 0
    noise, diffs = [], []
    for rp, op in zip(ref_pairs, ours_pairs, strict=True):
        by_noun = {p["noun"]: p for p in op}
        for p in rp:
            total += 1
            q = by_noun.get(p["noun"])
            if q and q["mask"] == p["mask"]:
                same += 1
                noise.append(abs(q["similarity"] - p["similarity"]))
                continue
            iou = float(rle.iou([p["mask"]], [q["mask"]])[0, 0]) if q else 0.0
            diffs.append({"noun": p["noun"], "iou": iou, "ref_margin": p["margin"], "ref_similarity": p["similarity"]})
    largest = max(noise, default=0.0)
    return {
        "pairs": total,
        "pairs_identical": same / max(1, total),
        "similarity_abs_diff_max": largest,
        "differences": len(diffs),
        "differences_within_noise": sum(1 for d in diffs if d["ref_margin"] is not None and d["ref_margin"] <= largest),
        "difference_list": diffs,
    }


def _records(args: argparse.Namespace, n: int) -> list[dict[str, Any]]:
    data = Path(args.data)
    return coco_records(data / "annotations" / "captions_val2017.json", data / "val2017", n)


def speed(args: argparse.Namespace, ckpt: str) -> dict[str, Any]:
    """Baseline vs ovseg-mine (bf16) vs ovseg-mine (fp32, agreement only), one image at a time, interleaved."""
    from reference import ReferenceMiner

    from ovseg_mine.mine.algorithms.nouns import load_nlp
    from ovseg_mine.models import clip_input_size, clip_mean_std, load_clip, load_sam

    points = args.points_per_side or 8
    cfg = bench_config(points, "bf16", ckpt)
    cfg32 = bench_config(points, "fp32", ckpt)
    records = _records(args, args.warmup + args.images)
    rows = with_nouns(records, nouns_with_spacy(records))
    memory = PeakRSS()
    impls: dict[str, Any] = {"ours": StageRunner(cfg)}
    if args.check_fp32:
        impls["ours_fp32"] = StageRunner(cfg32)
    sam, _ = load_sam("vit_b", ckpt)
    clip, tokenizer, _ = load_clip(cfg.clip.arch, "random", seed=cfg.seed)
    ref = ReferenceMiner(cfg32, sam, clip, tokenizer, load_nlp(), clip_input_size(clip), *clip_mean_std(clip))
    names = ["reference", *impls]
    wall = dict.fromkeys(names, 0.0)
    steps = {name: {} for name in names}
    pairs: dict[str, list] = {name: [] for name in names}
    masks: dict[str, list] = {name: [] for name in names}
    with tempfile.TemporaryFile("w+") as ref_out:
        for i, (record, row) in enumerate(zip(records, rows, strict=True)):
            timed = i >= args.warmup
            for name in names if i % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                with memory.track(name):
                    if name == "reference":
                        got, proposal_masks, t = ref.mine(record, ref_out)
                        masks[name].append(len(proposal_masks))
                    else:
                        results, t = impls[name].run([row])
                        got = results[0]["pairs"]
                        t.update({f"{k}_s": results[0][f"{k}_s"] for k in ("proposals", "crops", "clip")})
                        masks[name].append(results[0]["num_proposals"])
                seconds = time.perf_counter() - start
                print(f"image {record['image_id']} {name}: {seconds:.1f} s{'' if timed else ' (warm-up)'}", flush=True)
                if timed:
                    wall[name] += seconds
                    pairs[name].append(got)
                    for key, value in t.items():
                        steps[name][key] = steps[name].get(key, 0.0) + value / args.images
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": {"images": args.images, "warmup": args.warmup, "points": points, "sam": cfg.sam.model_dump()},
        "implementations": {
            name: {
                "seconds_per_image": wall[name] / args.images,
                "images_per_s": args.images / wall[name],
                "step_seconds_per_image": steps[name],
                "masks_per_image": float(np.mean(masks[name][args.warmup :])),
                "pairs_per_image": float(np.mean([len(p) for p in pairs[name]])),
                "peak_host_rss_gib": memory.peak.get(name, 0) / 2**30,
                "precision": (
                    {"sam": "fp32", "clip": "fp32"}
                    if name == "reference"
                    else {"sam": impls[name].engine.sam.precision, "clip": impls[name].engine.clip_precision}
                ),
            }
            for name in names
        },
    }
    report["speedup_vs_reference"] = {name: wall["reference"] / wall[name] for name in impls}
    report["agreement_vs_reference"] = {name: agreement(pairs["reference"], pairs[name]) for name in impls}
    return report


def proxies(args: argparse.Namespace, ckpt: str) -> dict[str, Any]:
    """Syncs, aten ops and non-torch time per image of the GPU stage, with the GPU's settings, on this CPU; bytes
    moved and FLOPs per part and a roofline estimate of GPU images/s (:func:`traffic_section`,
    :func:`decoder_traffic`) and issue 23's :func:`bars`. ``--traffic-only`` skips the three passes of syncs, ops
    and time; ``--no-traffic`` the pass of bytes."""
    from proxies import count, profile_time

    n = args.images
    points = args.points_per_side or 32
    extra = [*GPU_SETTINGS, f"sam.encoder_batch_size={n}", f"ray.batch_size={n}"]
    cfg = bench_config(points, "bf16", ckpt, extra)
    records = _records(args, n)
    rows = with_nouns(records, nouns_with_spacy(records))
    runner = StageRunner(cfg)
    decoded = runner.decode(rows)
    nouns = sorted({noun for row in rows for noun in row["nouns"]})
    new_nouns = iter(["zzz-first-noun", "zzz-second-noun"])  # count() runs twice: a noun not embedded yet each time
    text_ops = None if args.traffic_only else count(lambda: runner.engine.text.embed([next(new_nouns)]))
    runner.engine.text.embed(nouns)  # steady state: COCO train has ~12K nouns for 118K images
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "images": n,
            "points_per_side": points,
            "overrides": extra,
            "sam": cfg.sam.model_dump(),
            "clip": cfg.clip.model_dump(),
            "engine": cfg.engine.model_dump(),
        },
    }
    if not args.traffic_only:
        report |= _sync_op_time_proxies(runner, decoded, n, count, profile_time)
        report["text_encoder_per_new_noun"] = {
            k: text_ops[k] for k in ("syncs", "aten_ops", "aten_ops_excluding_views")
        }
    if args.no_traffic:
        return report
    report |= traffic_section(runner, decoded, n)
    per_call = args.decoder_prompts or runner.engine.sam.points_per_batch
    used = runner.engine.kernels
    report["decoder_traffic"] = {
        k: decoder_traffic(points, prompts_per_call=per_call, kernels=k) for k in dict.fromkeys([used, "stock"])
    }
    report["decoder_kernels"] = used
    report["decoder_bytes_per_prompt"] = report["decoder_traffic"][used]["bytes_per_prompt"]
    report["decoder_bytes_per_prompt_stock"] = report["decoder_traffic"]["stock"]["bytes_per_prompt"]
    report["bars"] = bars(report)
    return report


def bars(report: dict[str, Any]) -> dict[str, Any]:
    """Issue 23's bars, each ``{"value", "bar", "met"}``: decoder bytes per prompt (the kernels the run uses),
    upsampling + selection + crops GB per image (eager, and with the chunk bodies compiled), host syncs per image
    (blocking copies included; absent with ``--traffic-only``), roofline images/s on an H100 at 60 % (eager and
    compiled, CLIP padded as the run pads)."""
    compiled = report.get("compiled") or {}
    checks = {
        "decoder_mb_per_prompt": (report["decoder_bytes_per_prompt"] / 1e6, 60.0, "<="),
        "selection_and_crops_gb_per_image_eager": (report["selection_and_crops_gb_per_image"], 5.0, "<="),
        "selection_and_crops_gb_per_image_compiled": (compiled.get("selection_and_crops_gb_per_image"), 5.0, "<="),
        "syncs_per_image": (report.get("syncs_per_image"), 10.0, "<="),
        "h100_images_per_s_eager": (report["roofline_images_per_s"]["H100 SXM"], 20.0, ">="),
        "h100_images_per_s_compiled": (compiled.get("roofline_images_per_s", {}).get("H100 SXM"), 20.0, ">="),
    }
    return {
        name: {
            "value": value,
            "bar": f"{op} {bar}",
            "met": None if value is None else value <= bar if op == "<=" else value >= bar,
        }
        for name, (value, bar, op) in checks.items()
    }


def _sync_op_time_proxies(runner: StageRunner, decoded: Any, n: int, count: Any, profile_time: Any) -> dict[str, Any]:
    """The first three proxies (``proxies.py``): syncs and aten ops (two passes), non-torch time (a third)."""
    start = time.perf_counter()
    counted = count(lambda: runner.stage(decoded))
    count_s = time.perf_counter() - start
    profiled: dict[str, Any] = {}
    timing = profile_time(lambda: profiled.setdefault("rows", runner.stage(decoded)))
    results = profiled["rows"].to_pylist()
    return {
        "masks_per_image": float(np.mean([r["num_proposals"] for r in results])),
        "syncs_per_image": counted["syncs"] / n,
        "aten_ops_per_image": counted["aten_ops"] / n,
        "aten_ops_per_image_excluding_views": counted["aten_ops_excluding_views"] / n,
        "non_torch_ms_per_image": 1000 * timing["non_torch_s"] / n,
        "non_torch_ms_per_image_between_ops": 1000 * timing["non_torch_between_ops_s"] / n,
        "non_torch_ms_per_image_around_ops": 1000 * timing["non_torch_around_ops_s"] / n,
        "top_level_ops_per_image_profiled": timing["top_level_ops"] / n,
        "cpu_allocator_ms_per_image": 1000 * timing["allocator_s"] / n,
        "torch_ops_s_per_image": timing["torch_ops_s"] / n,
        "wall_s_per_image_profiled": timing["wall_s"] / n,
        "wall_s_per_image_counted": count_s / n,
        "syncs_by_kind": counted["syncs_by_kind"],
        "syncs_by_site": counted["syncs_by_site"],
        "top_ops": counted["top_ops"],
        "top_op_sites": counted["top_op_sites"],
    }


def traffic_section(runner: StageRunner, decoded: Any, n: int) -> dict[str, Any]:
    """Bytes moved and FLOPs per image by part (``traffic.py``), and the roofline's GPU time (``roofline.py``), of
    one pass of the GPU stage through ``MiningEngine.mine`` on this CPU, eager and with the selection's and crops'
    chunk bodies compiled (:func:`compiled_section`).

    Method: the pass runs for real on the CPU, with a GPU's rules (``engine.device_rules='cuda'``: bf16 weights
    in SAM's encoder and decoder, the IoU head in float32, CLIP in bf16, ``engine.kernels`` auto = fused), under
    :class:`traffic.ByteCounter`. Bytes and FLOPs of an op depend only on its shapes and dtypes, not on the
    device, so this is what the same ops would move on a GPU. A meta-device run is impossible through ``mine()``:
    its data-dependent steps (the score filters, NMS, the cap, the matched masks' run lengths) need real values,
    and the calibrated random weights (``calibration.py``) give the realistic ~100 masks per image that set the
    work of crops and CLIP. CLIP is counted as the run pads it: the engine's pooled calls of 256/128/64/32 crops
    (``matching.pooled_calls``); ``roofline_images_per_s_unpadded_clip`` scales CLIP's time to the crops kept.
    What differs from a GPU: the host-to-device copies of the pixels (a view on a CPU; a GPU moves the uint8
    image once, ~1 MB), and the CPU's choice of attention kernel (``sam_attention.py``'s SDPA with a bias:
    ``_scaled_dot_product_flash_attention_for_cpu`` here, a fused kernel of the same inputs and outputs on a GPU).
    """
    from chunk_bodies import BodyTally
    from roofline import DEVICES, estimate
    from traffic import PARTS, ByteCounter

    from ovseg_mine.mine.algorithms.matching import pooled_calls

    counter = ByteCounter()
    start = time.perf_counter()
    with BodyTally(counter, runner.engine) as tally, counter:
        results = runner.stage(decoded).to_pylist()
    seconds = time.perf_counter() - start
    counts = [r["num_proposals"] for r in results]
    if os.environ.get("OVSEG_BENCH_RECORDS"):  # the counted pass kept, to redo the figures from it
        import pickle

        with open(os.environ["OVSEG_BENCH_RECORDS"], "wb") as f:
            pickle.dump({"records": counter.records, "calls": tally.calls, "counts": counts, "n": n}, f)
    encoded = sum(size for size, _ in pooled_calls(counts, runner.cfg.clip.batch_size))
    gb = {part: b / n / 1e9 for part, b in counter.bytes_by_part().items()}
    roof = {d.name: estimate(counter.records, d, images=n) for d in DEVICES}
    kernel_roof = {d.name: estimate(counter.records, d, images=n, bytes_field="kernel_bytes") for d in DEVICES}
    report = {
        "masks_per_image": float(np.mean(counts)),
        "traffic_wall_s_per_image": seconds / n,
        "clip_crops_encoded_per_image": encoded / n,  # padded as the run pads: matching.pooled_calls
        "bytes_per_image": {part: b / n for part, b in counter.bytes_by_part().items()},
        "gb_per_image": gb | {"total": sum(gb.values())},
        "kernel_gb_per_image": {p: b / n / 1e9 for p, b in counter.bytes_by_part("kernel_bytes").items()},
        "flops_per_image": {part: f / n for part, f in counter.flops_by_part().items()},
        "gflop_per_image": {part: f / n / 1e9 for part, f in counter.flops_by_part().items()},
        "selection_and_crops_gb_per_image": gb["selection"] + gb["crops"],
        "top_byte_ops_by_part": {part: counter.top_ops(part, 8) for part in PARTS},
        "top_kernel_byte_ops_by_part": {part: counter.top_ops(part, 8, "kernel_bytes") for part in PARTS},
        "roofline": roof,
        "roofline_images_per_s": {name: r["images_per_s"] for name, r in roof.items()},
        "roofline_kernel_bytes_images_per_s": {name: r["images_per_s"] for name, r in kernel_roof.items()},
        "roofline_images_per_s_unpadded_clip": {name: _unpadded(r, sum(counts), encoded) for name, r in roof.items()},
    }
    report["compiled"] = compiled_section(counter, tally, n, sum(counts), encoded)
    return report


KINDS = ("selection", "crops")  # the chunk bodies (chunk_bodies.BODIES)


def compiled_section(counter: Any, tally: Any, n: int, crops: int, encoded: int) -> dict[str, Any]:
    """The traffic and roofline of the counted run with the fused selection's and crops' chunk bodies compiled
    (``chunk_bodies.compiled_records``): each body call's eager ops replaced by Inductor's bytes for it
    (``selection_bytes.inductor_bytes``, compiled on this CPU for the run's chunk of candidates and of crops at
    each image size of the run, per candidate and per crop, times the candidates and crops of the call, padding
    included), its FLOPs those of
    the compiled body's code (``chunk_bodies.compiled_body_flops``: the banded gathers, no matrix product).
    Everything else (encoder, decoder, CLIP, the glue between the bodies) keeps its eager count: no credit is
    taken for what Inductor would fuse there. Empty when the run used no chunk body (``engine.kernels=stock``)."""
    from chunk_bodies import compiled_body_flops, compiled_records
    from roofline import DEVICES, estimate
    from selection_bytes import inductor_bytes

    if {c.kind for c in tally.calls} != set(KINDS):
        return {}
    per_item, inductor, flops = {}, {}, {}
    for size in tally.sizes():
        body_flops = compiled_body_flops(size)
        flops |= {(kind, size): f for kind, f in body_flops.items()}
        chunk, crops_chunk = (max(c.items for c in tally.calls if c.size == size and c.kind == k) for k in KINDS)
        figures = inductor_bytes(size, chunk=chunk, crops=crops_chunk)  # (its *_gb scale to a Plan: not kept)
        figures = {k: v for k, v in figures.items() if k.endswith(("_per_candidate", "_per_crop"))}
        inductor[f"{size[0]}x{size[1]}"] = figures | {f"{k}_flops_per_item": f for k, f in body_flops.items()}
        per_item[("selection", size)] = figures["selection_chunk_mb_per_candidate"] * 1e6
        per_item[("crops", size)] = figures["crop_mb_per_crop"] * 1e6
    records = compiled_records(counter.records, tally.calls, per_item, flops)
    by_part = dict.fromkeys(counter.bytes_by_part(), 0)
    for r in records:
        by_part[r.part] += r.bytes
    gb = {part: b / n / 1e9 for part, b in by_part.items()}
    roof = {d.name: estimate(records, d, images=n) for d in DEVICES}
    return {
        "inductor_mb_per_item_by_image_size": inductor,
        "candidates_per_image_in_chunk_bodies": tally.items("selection") / n,
        "crops_per_image_in_chunk_bodies": tally.items("crops") / n,
        "gb_per_image": gb | {"total": sum(gb.values())},
        "selection_and_crops_gb_per_image": gb["selection"] + gb["crops"],
        "roofline": roof,
        "roofline_images_per_s": {name: r["images_per_s"] for name, r in roof.items()},
        "roofline_images_per_s_unpadded_clip": {name: _unpadded(r, crops, encoded) for name, r in roof.items()},
    }


def recompute_compiled(path: Path, proxies_report: dict[str, Any]) -> dict[str, Any]:
    """``proxies_report`` (a ``proxies`` section) with its ``compiled`` section and ``bars`` recomputed from the
    counted pass that run saved (``OVSEG_BENCH_RECORDS=path``: its records, chunk body calls and masks per image),
    with today's chunk bodies compiled (:func:`compiled_section`: Inductor's bytes per candidate and per crop,
    compiled again on this CPU). The eager figures are kept. CLIP's pooled calls are those of the report's
    ``clip.batch_size``."""
    import pickle

    from chunk_bodies import BodyTally
    from traffic import ByteCounter

    from ovseg_mine.mine.algorithms.matching import pooled_calls

    with open(path, "rb") as f:
        saved = pickle.load(f)
    counter = ByteCounter()
    counter.records = saved["records"]
    tally = BodyTally(counter, calls=saved["calls"])
    counts = saved["counts"]
    encoded = sum(size for size, _ in pooled_calls(counts, proxies_report["settings"]["clip"]["batch_size"]))
    report = dict(proxies_report)
    report["compiled"] = compiled_section(counter, tally, saved["n"], sum(counts), encoded)
    report["bars"] = bars(report)
    return report


def _unpadded(roof: dict[str, Any], crops: int, encoded: int) -> float:
    """Images/s of a roofline estimate with CLIP's time scaled from the ``encoded`` crops (padded as the run pads,
    ``matching.pooled_calls``) to the ``crops`` kept: what a batch that fills CLIP's calls pays per image."""
    by_part = roof["ms_per_image_by_part"]
    ms = roof["ms_per_image"] - by_part.get("clip", 0.0) * (1 - crops / max(1, encoded))
    return 1000 / ms


def decoder_traffic(
    points_per_side: int, *, prompts_per_call: int, kernels: str, size: tuple[int, int] = (480, 640)
) -> dict:
    """Bytes and FLOPs of SAM ``vit_b``'s decoder per point prompt, counted on the meta device (no computation)
    through the engine's own decoding path, ``BatchedSam.decode`` with ``kernels`` (``stock`` or ``fused``), under
    a GPU's rules: bf16 decoder weights and features, the IoU head in float32, ``prompts_per_call`` prompts per
    decoder call, ``points_per_side**2`` prompts of a COCO-size image (``size`` ``(H, W)``; the decoder's shapes
    do not depend on it). Counted by ``decoder_bytes.decoder_counter`` (the figures of ``decoder_bytes.py``)."""
    from decoder_bytes import decoder_counter
    from roofline import DEVICES, estimate

    prompts = points_per_side**2
    counter = decoder_counter("vit_b", kernels, prompts, prompts_per_call, size)
    moved = lambda field: sum(getattr(r, field) for r in counter.records)  # noqa: E731
    roof = {d.name: estimate(counter.records, d, images=1)["ms_per_image"] for d in DEVICES}
    return {
        "kernels": kernels,
        "prompts": prompts,
        "prompts_per_call": prompts_per_call,
        "bytes_per_prompt": moved("bytes") / prompts,
        "kernel_bytes_per_prompt": moved("kernel_bytes") / prompts,
        "gb_per_image": moved("bytes") / 1e9,
        "gflop_per_image": counter.total_flops / 1e9,
        "top_byte_ops": dict(list(counter.bytes_by_op().items())[:12]),
        "roofline_ms_per_image": roof,
    }


def compile_check(args: argparse.Namespace, ckpt: str) -> dict[str, Any]:
    """Eager against compiled (``engine.compile=args.mode``) on images of mixed sizes, with a GPU's rules: pairs
    identical, graph breaks per part (``torch._dynamo.explain`` of each part's eager callable on the inputs the
    eager run gave it), graphs compiled and recompiles per part and their compile seconds (dynamo's compilation
    records of the compiled runs, the batch twice then each image alone, each given to the part during whose call
    it was made), and the time outside torch ops per image of the eager run measured without the profiler
    (``host_time.py``). The parts are listed in ``compile_parts.PARTS``."""
    from compile_parts import attribute_compilations, capture_inputs, clear_compilation_metrics, graph_breaks, summarize
    from host_time import keep_freed_memory, non_torch_time

    kept = keep_freed_memory()  # before the models load: no munmap of freed blocks between ops
    points = args.points_per_side or (4 if args.tiny else 16)
    n = args.images
    extra = [*GPU_SETTINGS, f"sam.encoder_batch_size={n}", f"ray.batch_size={n}", *(TINY_MODELS if args.tiny else [])]
    extra += args.set
    cfg = bench_config(points, args.precision, ckpt, [*extra, "engine.compile='off'"])
    cfgc = bench_config(points, args.precision, ckpt, [*extra, f"engine.compile={args.mode!r}"])
    records = _records(args, max(n, 16))
    records = _mixed_sizes(records, n)
    rows = with_nouns(records, nouns_with_spacy(records))
    eager = StageRunner(cfg)
    decoded = eager.decode(rows)
    with capture_inputs(eager.engine) as inputs:
        eager.stage(decoded)  # warm-up, and each part's inputs
    ours, seconds = eager.run(rows)
    seconds["gpu"] = min(seconds["gpu"], eager.run(rows)[1]["gpu"])
    host = non_torch_time(lambda: eager.stage(decoded))
    breaks = graph_breaks(eager.engine, inputs)
    clear_compilation_metrics()
    compiled = StageRunner(cfgc)
    with attribute_compilations(compiled.engine) as owned:
        first, first_s = compiled.run(rows)
        theirs, steady = compiled.run(rows)
        for row in rows:
            compiled.run([row])
    records_c = [m for records in owned.values() for m in records]
    per_part = summarize(owned)
    pairs = lambda results: [r["pairs"] for r in results]  # noqa: E731
    same = agreement(pairs(ours), pairs(theirs))
    return {
        "machine": machine(),
        "settings": {
            "images": n,
            "sizes_hw": [[r["height"], r["width"]] for r in rows],
            "points_per_side": points,
            "models": {"sam": cfg.sam.model_type, "clip": cfg.clip.arch},
            "precision": {"sam": eager.engine.sam.precision, "clip": eager.engine.clip_precision},
            "mode": args.mode,
            "overrides": extra,
            "glibc_keeps_freed_memory": kept,
        },
        "pairs_identical": same["pairs_identical"],
        "pairs_identical_first_compiled_call": agreement(pairs(ours), pairs(first))["pairs_identical"],
        "agreement": same,
        "pairs": sum(len(r["pairs"]) for r in ours),
        "graph_breaks": {name: part.get("graph_breaks", part) for name, part in breaks.items()},
        "graph_breaks_detail": breaks,
        "recompiles": {name: part["recompiles"] for name, part in per_part.items()},
        "compile_s": {name: part["compile_s"] for name, part in per_part.items()},
        "compilations": per_part,
        "compiled_graphs_total": len(records_c),
        "compile_s_total": round(sum(m.entire_frame_compile_time_s or 0.0 for m in records_c), 3),
        "eager_gpu_stage_s_per_image": seconds["gpu"] / n,
        "compiled_first_call_s": first_s["gpu"],
        "compiled_gpu_stage_s_per_image": steady["gpu"] / n,
        "non_torch_ms_per_image": 1000 * host["non_torch_s"] / n,
        "non_torch_ms_per_image_lower_estimate": 1000 * host["non_torch_s_lower"] / n,
        "non_torch_wall_ms_per_image": 1000 * host["non_torch_wall_s"] / n,
        "torch_ops_per_image": host["ops"] / n,
        "non_torch_us_per_op": 1e6 * host["non_torch_s"] / max(1, host["ops"]),
        "host_time": host,
        "note": "non_torch_ms_per_image is of the eager run (host_time.py: compiled kernels bypass the dispatcher)"
        + ("" if records_c else "; the engine compiled nothing: engine.compile is not applied on this device"),
    }


def _mixed_sizes(records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The first ``n`` records with pairwise different ``(height, width)`` (images of mixed sizes).

    Raises:
        ValueError: fewer than ``n`` distinct sizes among ``records``."""
    out, seen = [], set()
    for record in records:
        if (record["height"], record["width"]) not in seen:
            seen.add((record["height"], record["width"]))
            out.append(record)
        if len(out) == n:
            return out
    raise ValueError(f"fewer than {n} distinct image sizes in the first {len(records)} images")


def big_image(args: argparse.Namespace, ckpt: str) -> dict[str, Any]:
    """Peak host memory of the GPU stage (on this CPU) for a default-size batch of COCO images, of 64 MP images,
    and the memory the models take: what a 64 MP image costs beyond a small one is its pixels, not its masks."""
    from PIL import Image

    points = args.points_per_side or 8
    cfg = bench_config(points, "bf16", ckpt)
    batch = cfg.ray.batch_size if args.images <= 0 else args.images
    records = _records(args, batch)
    rows = with_nouns(records, nouns_with_spacy(records))
    memory = PeakRSS()
    with memory.track("models"):
        runner = StageRunner(cfg)
        time.sleep(0.05)
    report: dict[str, Any] = {"machine": machine(), "settings": {"batch": batch, "points_per_side": points}}
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.jpg"
        Image.open(records[0]["path"]).convert("RGB").resize((9216, 6912), Image.BICUBIC).save(big, quality=90)
        big_rows = [{**row, "path": str(big), "width": 9216, "height": 6912} for row in rows]
        for label, batch_rows in (("coco", rows), ("64mp", big_rows)):
            decoded = runner.decode(batch_rows)
            start = time.perf_counter()
            with memory.track(label):
                out = runner.stage(decoded).to_pylist()
            report[label] = {
                "images": len(batch_rows),
                "pixels_per_image": batch_rows[0]["width"] * batch_rows[0]["height"],
                "seconds": time.perf_counter() - start,
                "peak_rss_gib": memory.peak[label] / 2**30,
                "decoded_batch_gib": decoded.nbytes / 2**30,
                "statuses": sorted({r["status"] for r in out}),
                "masks_per_image": float(np.mean([r["num_proposals"] for r in out])),
            }
            del decoded
            print(label, report[label], flush=True)
    report["models_rss_gib"] = memory.peak["models"] / 2**30
    report["chunk_mib"] = cfg.ray.chunk_mib
    return report


def ray_end_to_end(args: argparse.Namespace, ckpt: str) -> dict[str, Any]:
    """The real pipeline (``ovseg_mine.mine.run.driver.mine``, a local Ray) on the first N coco-mini images."""
    from ovseg_mine.mine.run.driver import mine
    from ovseg_mine.mine.sources import MineInput

    points = args.points_per_side or 8
    cfg = bench_config(points, "bf16", ckpt, [f"source.limit={args.images}", f"ray.batch_size={args.batch}"])
    data = Path(args.data)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        captions = data / "annotations" / "captions_val2017.json"
        manifest = mine(cfg, MineInput("coco", captions, image_root=data / "val2017"), Path(out) / "run")
        wall = time.perf_counter() - start
    images = manifest["counts"]["images"]
    stage_s = manifest["timings"]["stage_s"]
    return {
        "machine": machine(),
        "settings": {"images": images, "points_per_side": points, "ray_batch_size": args.batch},
        "wall_s": wall,
        "images_per_s_end_to_end": images / wall,
        "images_per_s_in_run": manifest["timings"]["images_per_s"],
        "stage_seconds_per_image": {k: v / images for k, v in stage_s.items()},
        "pairs": manifest["counts"]["pairs"],
    }


def nouns_speed(args: argparse.Namespace) -> dict[str, Any]:
    """Captions/s of the noun stage's extraction on coco-mini's captions, repeated to ``--nouns-captions``."""
    from ovseg_mine.mine.algorithms.nouns import extract_nouns, load_nlp

    coco = json.loads((Path(args.data) / "annotations" / "captions_val2017.json").read_text())
    captions = [[a["caption"]] for a in coco["annotations"]]
    per_image = (captions * (-(-args.nouns_captions // len(captions))))[: args.nouns_captions]
    nlp = load_nlp()
    extract_nouns(nlp, per_image[:256])
    start = time.perf_counter()
    extract_nouns(nlp, per_image)
    seconds = time.perf_counter() - start
    return {"captions": len(per_image), "seconds": seconds, "captions_per_s": len(per_image) / seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "part",
        choices=["speed", "proxies", "proxies-compiled", "compile", "ray", "big-image", "nouns", "nouns-json"],
    )
    parser.add_argument("--data", default=str(COCO_MINI), help="COCO layout: annotations/, val2017/")
    parser.add_argument("--images", type=int, default=2, help="images timed")
    parser.add_argument("--warmup", type=int, default=1, help="speed: images run first by everyone, not timed")
    parser.add_argument(
        "--points-per-side",
        type=int,
        default=None,
        help="default: 8 (speed, ray), 32 (proxies), 16 (compile; 4 --tiny)",
    )
    parser.add_argument("--batch", type=int, default=4, help="ray: images per GPU-stage call")
    parser.add_argument("--check-fp32", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--nouns-captions", type=int, default=20000)
    parser.add_argument("--traffic-only", action="store_true", help="proxies: only bytes, FLOPs and the roofline")
    parser.add_argument("--no-traffic", action="store_true", help="proxies: only syncs, ops and time (no bytes)")
    parser.add_argument(
        "--decoder-prompts", type=int, default=None, help="proxies: prompts per meta decoder call (default: the run's)"
    )
    parser.add_argument("--tiny", action="store_true", help="compile: the tiny random SAM and CLIP (a quick run)")
    parser.add_argument("--mode", default="default", choices=["default", "reduce-overhead"], help="compile: mode")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="compile: SAM and CLIP")
    parser.add_argument("--set", action="append", default=[], help="compile: a config override (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu.json"))
    parser.add_argument(
        "--records", type=Path, default=None, help="proxies-compiled: a counted pass saved with OVSEG_BENCH_RECORDS"
    )
    args = parser.parse_args(argv)

    if args.part == "proxies-compiled":  # --out's proxies section, its compiled figures and bars redone
        if args.records is None:
            parser.error("proxies-compiled needs --records")
        report = json.loads(args.out.read_text())
        report["proxies"] = recompute_compiled(args.records, report["proxies"])
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps({k: report["proxies"][k] for k in ("bars",)} | {"compiled": report["proxies"]["compiled"]}))
        return report["proxies"]

    if args.part == "nouns-json":
        from harness import sample_records

        table = nouns_with_spacy(sample_records(16))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({str(k): v for k, v in sorted(table.items())}, indent=1) + "\n")
        print(f"nouns of {len(table)} images: {args.out}")
        return table
    with tempfile.TemporaryDirectory() as tmp:
        model_type = "tiny" if args.tiny else "vit_b"
        ckpt = calibrated_checkpoint(model_type, str(Path(tmp) / f"sam_{model_type}_calibrated.pth"))
        section = {
            "speed": lambda: speed(args, ckpt),
            "proxies": lambda: proxies(args, ckpt),
            "compile": lambda: compile_check(args, ckpt),
            "ray": lambda: ray_end_to_end(args, ckpt),
            "big-image": lambda: big_image(args, ckpt),
            "nouns": lambda: nouns_speed(args),
        }[args.part]()
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    key = f"{args.part}_tiny" if args.tiny else args.part
    report[key] = section
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in section.items() if k not in ("machine", "top_ops")}, indent=1)[:4000])
    print(f"\nJSON: {args.out} [{key}]")
    return section


__all__ = ["main"]

if __name__ == "__main__":
    main()
