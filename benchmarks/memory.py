"""Host memory of a mining run at 1x and 10x the input: it must stream, not grow with the input.

Builds two COCO Captions datasets from ../shared/data/coco-mini (79 val2017 images): 1x is coco-mini itself,
10x lists every image 10 times under distinct ids (the same files, so decoding and model work per image stay
the same). Mines each with the ``smoke`` recipe in a real ``ovseg-mine mine`` subprocess on a local Ray, and
samples every 0.2 s, with psutil, the resident memory (RSS) of the driver and of the whole process tree it
starts (Ray's GCS, raylet and workers). The tree sum counts Ray's shared object store once per process
that maps it, so it is an upper bound.

Usage::

    python benchmarks/memory.py [--coco-mini ../shared/data/coco-mini] [--factors 1 10] [--json out.json]

Prints a table and writes JSON. A benchmark, not a test: the 10x run takes about 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
ID_STRIDE = 10_000_000  # COCO ids are below 600,000: copy k of image i gets id i + k * ID_STRIDE


def build_captions(coco_mini: Path, factor: int, dest: Path) -> Path:
    """A captions JSON listing each coco-mini image ``factor`` times under distinct ids; returns its path."""
    data = json.loads((coco_mini / "annotations" / "captions_val2017.json").read_text(encoding="utf-8"))
    images, annotations = [], []
    for k in range(factor):
        images += [{**image, "id": image["id"] + k * ID_STRIDE} for image in data["images"]]
        annotations += [
            {**ann, "id": ann["id"] + k * ID_STRIDE, "image_id": ann["image_id"] + k * ID_STRIDE}
            for ann in data["annotations"]
        ]
    path = dest / f"captions_x{factor}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}), encoding="utf-8")
    return path


def _tree_rss(root: psutil.Process) -> tuple[int, int, int]:
    """(driver RSS, tree RSS sum, number of processes) in bytes."""
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0, 0
    total = driver = 0
    for process in processes:
        try:
            rss = process.memory_info().rss
        except psutil.Error:
            continue
        total += rss
        if process.pid == root.pid:
            driver = rss
    return driver, total, len(processes)


def measure(captions: Path, images: Path, out: Path, interval_s: float = 0.2) -> dict:
    """Mine ``captions`` with the smoke recipe into ``out`` while sampling memory; returns the figures."""
    command = [
        sys.executable,
        "-m",
        "ovseg_mine.cli",
        "mine",
        "--pipeline",
        "smoke",
        "--captions",
        str(captions),
        "--images",
        str(images),
        "--out",
        str(out),
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak_driver = peak_tree = peak_procs = 0
    while proc.poll() is None:
        driver, tree, count = _tree_rss(root)
        peak_driver, peak_tree, peak_procs = max(peak_driver, driver), max(peak_tree, tree), max(peak_procs, count)
        time.sleep(interval_s)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"mining failed (rc {proc.returncode}):\n{stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return {
        "images": manifest["counts"]["images"],
        "pairs": manifest["counts"]["pairs"],
        "wall_s": round(time.perf_counter() - start, 1),
        "images_per_s": manifest["timings"]["images_per_s"],
        "peak_driver_rss_mib": round(peak_driver / 2**20, 1),
        "peak_tree_rss_mib": round(peak_tree / 2**20, 1),
        "peak_processes": peak_procs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco-mini", type=Path, default=REPO.parent / "shared" / "data" / "coco-mini")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "memory.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for factor in args.factors:
            captions = build_captions(args.coco_mini, factor, Path(tmp))
            results[f"x{factor}"] = measure(captions, args.coco_mini / "val2017", Path(tmp) / f"run_x{factor}")
            print(f"x{factor}: {results[f'x{factor}']}", flush=True)
    report = {
        "machine": {"cpus": psutil.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
        "recipe": "smoke",
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\n{'input':>6} {'images':>7} {'pairs':>7} {'wall s':>8} {'img/s':>7} {'driver MiB':>11} {'tree MiB':>9}")
    for name, r in results.items():
        print(
            f"{name:>6} {r['images']:>7} {r['pairs']:>7} {r['wall_s']:>8} {r['images_per_s']:>7} "
            f"{r['peak_driver_rss_mib']:>11} {r['peak_tree_rss_mib']:>9}"
        )
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
