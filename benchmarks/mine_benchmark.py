"""Mine N images with ovseg-mine and with the hand-written baseline (benchmarks/reference.py), side by side in one
process, and report throughput per stage, peak memory and agreement, as JSON and a table.

    python benchmarks/mine_benchmark.py --images 3 --out benchmarks/results/cpu.json

Both implementations see the same images, models (real-size architectures: SAM ``vit_b``, open_clip ``ViT-B-16``;
seeded random weights unless ``--weights pretrained``), parameters and thread count. Images are interleaved: for
image i the baseline runs first when i is even, ovseg-mine first when i is odd, so that load on a shared machine
falls on both. See benchmarks/README.md for what is measured and why the settings are what they are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ovseg_mine import rle
from ovseg_mine.config import build_config

STAGES = ("nouns", "decode", "proposals", "crops", "clip", "write")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"


class PeakMemory:
    """Peak resident set size (from /proc/self/statm, sampled every 10 ms) and peak CUDA memory, per label."""

    def __init__(self) -> None:
        self.host: dict[str, int] = {}
        self.gpu: dict[str, int] = {}
        self.label: str | None = None
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            label = self.label
            if label is not None:
                self.host[label] = max(self.host.get(label, 0), self._rss())

    @contextmanager
    def track(self, label: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.label = label
        self.host[label] = max(self.host.get(label, 0), self._rss())
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                self.gpu[label] = max(self.gpu.get(label, 0), torch.cuda.max_memory_allocated())
            self.label = None


def load_records(data: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` images of ``annotations/captions_val2017.json`` by id (first caption, as the paper)."""
    coco = json.loads((data / "annotations" / "captions_val2017.json").read_text())
    captions: dict[int, list[str]] = {}
    for ann in sorted(coco["annotations"], key=lambda a: a["id"]):
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    images = sorted(coco["images"], key=lambda im: im["id"])[:n]
    return [
        {
            "image_id": im["id"],
            "file_name": im["file_name"],
            "path": str(data / "val2017" / im["file_name"]),
            "width": im["width"],
            "height": im["height"],
            "captions": captions[im["id"]][:1],
        }
        for im in images
    ]


class Recorder:
    """Wraps a mask generator and keeps its last :class:`~ovseg_mine.mine.proposals.Proposals` (for agreement)."""

    def __init__(self, generator: Any) -> None:
        self.generator, self.last = generator, None

    def __call__(self, image: np.ndarray) -> Any:
        self.last = self.generator(image)
        return self.last


def agreement(
    ref_masks: list[list[dict]],
    ours_masks: list[list[dict]],
    ref_pairs: list[list[dict]],
    ours_pairs: list[list[dict]],
    iou_min: float = 0.95,
) -> dict[str, Any]:
    """Proposal and pair agreement between two runs over the same images (RLE masks)."""
    matched = total = same_index = 0
    pair_same = pair_total = 0
    noise: list[float] = []
    diffs: list[dict[str, Any]] = []
    for rm, om, rp, op in zip(ref_masks, ours_masks, ref_pairs, ours_pairs, strict=True):
        total += len(rm)
        if rm and om:
            ious = rle.iou(rm, om)  # [len(rm), len(om)]
            matched += int((ious.max(axis=1) >= iou_min).sum())
            same_index += sum(1 for i in range(min(len(rm), len(om))) if ious[i, i] >= iou_min)
        by_noun = {p["noun"]: p for p in op}
        for p in rp:
            pair_total += 1
            q = by_noun.get(p["noun"])
            iou = float(rle.iou([p["mask"]], [q["mask"]])[0, 0]) if q else 0.0
            if q and iou >= iou_min:
                pair_same += 1
                noise.append(abs(q["similarity"] - p["similarity"]))
            else:
                diffs.append(
                    {
                        "noun": p["noun"],
                        "iou": iou,
                        "ref_margin": p["margin"],
                        "ref_similarity": p["similarity"],
                        "ours_similarity": q["similarity"] if q else None,
                    }
                )
    max_noise = max(noise, default=0.0)
    within = sum(1 for d in diffs if d["ref_margin"] is not None and d["ref_margin"] <= max_noise)
    return {
        "proposals_matched": matched / max(1, total),
        "proposals_same_rank": same_index / max(1, total),
        "proposals": total,
        "pairs": pair_total,
        "pairs_identical": pair_same / max(1, pair_total),
        "similarity_abs_diff_max": max_noise,
        "similarity_abs_diff_median": float(np.median(noise)) if noise else 0.0,
        "differences": len(diffs),
        "differences_within_noise": within,
        "ref_margin_of_differences_max": max((d["ref_margin"] or 0.0 for d in diffs), default=0.0),
        "difference_list": diffs,
    }


def nouns_benchmark(data: Path, nlp: Any, min_captions: int, batch_size: int) -> dict[str, Any]:
    """Captions/s of :func:`ovseg_mine.mine.nouns.extract_nouns` on all captions of the data set, repeated."""
    from ovseg_mine.mine.nouns import extract_nouns

    coco = json.loads((data / "annotations" / "captions_val2017.json").read_text())
    captions = [a["caption"] for a in coco["annotations"]]
    reps = -(-min_captions // len(captions))
    per_image = [[c] for c in captions] * reps
    extract_nouns(nlp, per_image[:256], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    extract_nouns(nlp, per_image, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return {"captions": len(per_image), "seconds": seconds, "captions_per_s": len(per_image) / seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="COCO layout: annotations/, val2017/")
    parser.add_argument("--images", type=int, default=3, help="images timed (after the warm-up image)")
    parser.add_argument("--warmup", type=int, default=1, help="images run first by every implementation, not timed")
    parser.add_argument("--points-per-side", type=int, default=None, help="default: 8 on CPU, 32 on GPU")
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument(
        "--masks", type=int, default=64, help="max_masks_per_image: masks per image cropped and encoded"
    )
    parser.add_argument(
        "--precision", default=None, help="ovseg-mine's precision (sam.precision and clip.precision); default bf16"
    )
    parser.add_argument(
        "--check-fp32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run ovseg-mine in fp32 (agreement only, not timed against the baseline)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline (GPU throughput runs)")
    parser.add_argument("--nouns-captions", type=int, default=20000, help="captions timed by the nouns benchmark")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/benchmark.json"))
    args = parser.parse_args(argv)

    import pyarrow as pa
    from reference import ReferenceMiner  # benchmarks/ is on sys.path when this script runs

    from ovseg_mine.mine.nouns import load_nlp
    from ovseg_mine.mine.stages import MaskMatchStage, NounStage
    from ovseg_mine.models import clip_input_size, clip_mean_std, load_clip, load_sam
    from ovseg_mine.shards import pair_schema, write_shard

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    points = args.points_per_side or (32 if cuda else 8)
    precision = args.precision or "bf16"
    overrides = [
        "sam.checkpoint=random",
        "clip.pretrained=random",
        f"sam.points_per_side={points}",
        f"sam.points_per_batch={args.points_per_batch}",
        "sam.pred_iou_thresh=0.0",
        "sam.stability_score_thresh=0.0",
        "sam.box_nms_thresh=1.0",
        f"sam.max_masks_per_image={args.masks}",
        f"clip.precision={precision!r}",
        f"sam.precision={precision!r}",
    ]
    cfg = build_config("coco-ovseg", overrides)
    fp32_cfg = cfg.model_copy(
        update={
            "clip": cfg.clip.model_copy(update={"precision": "fp32"}),
            "sam": cfg.sam.model_copy(update={"precision": "fp32"}),
        }
    )
    records = load_records(args.data, args.warmup + args.images)
    warm, timed = records[: args.warmup], records[args.warmup :]

    nlp = load_nlp(cfg.nouns.model)
    memory = PeakMemory()
    ours = MaskMatchStage(cfg.model_dump(mode="json"), "random", "random")
    ours.generator = Recorder(ours.generator)
    checks = {}
    if args.check_fp32:
        checks["ours_fp32"] = MaskMatchStage(fp32_cfg.model_dump(mode="json"), "random", "random")
        checks["ours_fp32"].generator = Recorder(checks["ours_fp32"].generator)
    nouns_stage = NounStage(cfg.model_dump(mode="json"))
    ref = None
    if not args.no_baseline:
        sam, _ = load_sam(cfg.sam.model_type, "random", device=device, seed=cfg.seed)
        clip, tokenizer, _ = load_clip(cfg.clip.arch, "random", device=device, seed=cfg.seed)
        ref = ReferenceMiner(cfg, sam, clip, tokenizer, nlp, clip_input_size(clip), *clip_mean_std(clip))

    seconds = {name: dict.fromkeys(STAGES, 0.0) for name in ("reference", "ours", *checks)}
    results: dict[str, dict[str, list]] = {name: {"masks": [], "pairs": []} for name in seconds}
    ref_out = tempfile.TemporaryFile("w+")  # the baseline writes JSON lines

    def run_ours(name: str, stage: Any, rows: list[dict], timed_run: bool) -> list[dict]:
        with memory.track(name):
            start = time.perf_counter()
            table = nouns_stage(pa.Table.from_pylist(rows))
            nouns_s = time.perf_counter() - start
            out = []
            for row in table.to_pylist():
                stage.generator.last = None
                result = stage(pa.Table.from_pylist([row])).to_pylist()[0]
                out.append(result)
                if timed_run:
                    for key in ("decode", "proposals", "crops", "clip"):
                        seconds[name][key] += result[f"{key}_s"]
                    last = stage.generator.last
                    results[name]["masks"].append(last.rles if last is not None else [])
                    results[name]["pairs"].append(result["pairs"])
            if timed_run:
                seconds[name]["nouns"] += nouns_s
        return out

    def run_ref(rows: list[dict], timed_run: bool) -> None:
        with memory.track("reference"):
            for row in rows:
                pairs, masks, t = ref.mine(row, ref_out)
                if timed_run:
                    for key, value in t.items():
                        seconds["reference"][key] += value
                    results["reference"]["masks"].append(rle.encode_many(masks))
                    results["reference"]["pairs"].append(pairs)

    wall = dict.fromkeys(seconds, 0.0)
    for i, row in enumerate(warm + timed):
        timed_run = i >= len(warm)
        order = ["reference", "ours", *checks] if i % 2 == 0 else ["ours", *checks, "reference"]
        for name in order:
            if name == "reference" and ref is None:
                continue
            start = time.perf_counter()
            if name == "reference":
                run_ref([row], timed_run)
            else:
                stage = ours if name == "ours" else checks[name]
                run_ours(name, stage, [row], timed_run)
            if timed_run:
                wall[name] += time.perf_counter() - start
            print(
                f"image {row['image_id']} {name}: {time.perf_counter() - start:.1f} s"
                f"{'' if timed_run else ' (warm-up)'}",
                flush=True,
            )

    # Writing: ovseg-mine writes one Parquet shard of all pairs (the pipeline's shard writer).
    for name in ("ours", *checks):
        with tempfile.TemporaryDirectory() as run_dir, memory.track(name):
            pairs = [p for image_pairs in results[name]["pairs"] for p in image_pairs]
            start = time.perf_counter()
            write_shard(
                run_dir,
                0,
                pa.Table.from_pylist(pairs, schema=pair_schema()),
                file_metadata={},
                done_record={},
                row_group_size=cfg.shards.row_group_size,
            )
            seconds[name]["write"] = time.perf_counter() - start
            wall[name] += seconds[name]["write"]

    n = len(timed)
    names = [name for name in ("reference", "ours", *checks) if not (name == "reference" and ref is None)]
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "loadavg": os.getloadavg(),
        },
        "settings": {
            "images": n,
            "warmup": len(warm),
            "sam": cfg.sam.model_dump(),
            "clip": cfg.clip.model_dump(),
            "ours_precision": ours.precision,
            "weights": "random",
        },
        "implementations": {},
    }
    for name in names:
        total = wall[name]
        report["implementations"][name] = {
            "images_per_s": n / total,
            "seconds_per_image": total / n,
            "stage_seconds_per_image": {k: v / n for k, v in seconds[name].items()},
            "stage_images_per_s": {k: (n / v if v > 0 else None) for k, v in seconds[name].items()},
            "peak_host_rss_gib": memory.host.get(name, 0) / 2**30,
            "peak_gpu_gib": memory.gpu.get(name, 0) / 2**30 if cuda else None,
            "masks_per_image": float(np.mean([len(m) for m in results[name]["masks"]])),
            "pairs_per_image": float(np.mean([len(p) for p in results[name]["pairs"]])),
        }
    if ref is not None:
        report["speedup_vs_reference"] = {name: wall["reference"] / wall[name] for name in names if name != "reference"}
        report["agreement_vs_reference"] = {
            name: agreement(
                results["reference"]["masks"],
                results[name]["masks"],
                results["reference"]["pairs"],
                results[name]["pairs"],
            )
            for name in names
            if name != "reference"
        }
    report["nouns"] = nouns_benchmark(args.data, nlp, args.nouns_captions, cfg.nouns.batch_size)
    report["machine"]["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"\nJSON: {args.out}")
    return report


def print_table(report: dict[str, Any]) -> None:
    impls = report["implementations"]
    names = list(impls)
    print(
        f"\n{report['settings']['images']} images, {report['machine']['device']}, torch threads "
        f"{report['machine']['torch_threads']}, load {report['machine']['loadavg']}"
    )
    print(f"{'':28}" + "".join(f"{n:>14}" for n in names))
    print(f"{'images/s end to end':28}" + "".join(f"{impls[n]['images_per_s']:14.4f}" for n in names))
    print(f"{'s/image end to end':28}" + "".join(f"{impls[n]['seconds_per_image']:14.2f}" for n in names))
    for stage in STAGES:
        print(
            f"{'  ' + stage + ' s/image':28}"
            + "".join(f"{impls[n]['stage_seconds_per_image'][stage]:14.3f}" for n in names)
        )
    print(f"{'peak host RSS GiB':28}" + "".join(f"{impls[n]['peak_host_rss_gib']:14.2f}" for n in names))
    if impls[names[0]]["peak_gpu_gib"] is not None:
        print(f"{'peak GPU GiB':28}" + "".join(f"{impls[n]['peak_gpu_gib']:14.2f}" for n in names))
    print(f"{'masks/image':28}" + "".join(f"{impls[n]['masks_per_image']:14.1f}" for n in names))
    for name, ratio in report.get("speedup_vs_reference", {}).items():
        a = report["agreement_vs_reference"][name]
        print(
            f"{name}: {ratio:.2f}x the baseline; pairs identical {a['pairs_identical']:.1%} of {a['pairs']} "
            f"({a['differences']} differ, {a['differences_within_noise']} of them with a baseline margin <= the "
            f"largest |similarity difference| {a['similarity_abs_diff_max']:.2e} seen on identical pairs); "
            f"proposals matched (IoU>=0.95) {a['proposals_matched']:.1%}, same rank {a['proposals_same_rank']:.1%}"
        )
    nouns = report["nouns"]
    print(f"nouns: {nouns['captions_per_s']:.0f} captions/s ({nouns['captions']} captions, {nouns['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
