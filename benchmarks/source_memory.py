"""Driver memory and throughput of the source read step (and the noun stage) at 10K vs 1M rows.

Generates a Parquet captions source laid out as a Hugging Face dataset (``data/train-NNNNN-of-MMMMM.parquet``,
10,000 rows per file): an ``image`` column of paths that cycle over a few real COCO images (coco-mini, or the
bundled sample) and a ``caption`` column cycling over their real captions. Then, in a child process (the
"driver"), it runs what a mining run's driver runs up to the noun stage: ``HfSource.plan`` (one light task per
file), the read step (:func:`ovseg_mine.mine.sources.read.records_dataset`) and, with ``--stages nouns``, the
:class:`~ovseg_mine.mine.graph.stages.NounStage` actor pool, on a local Ray, iterating every result in the driver and
doing the driver's per-shard bookkeeping (:class:`~ovseg_mine.mine.run.inflight.InFlightShards`: results held until
their shard is complete, then dropped). No SAM, no CLIP, no shard writing: this isolates the source side.

The parent samples, every 0.2 s with psutil, the resident memory (RSS) of the driver and of the whole process
tree (Ray's GCS, raylet, workers; Ray's shared object store is counted once per process that maps it, so the tree
sum is an upper bound).

Usage::

    python benchmarks/source_memory.py [--rows 10000 1000000] [--stages read nouns] [--json out.json]

A benchmark, not a test: 1M rows through the noun stage takes about 15 minutes on 2 CPU cores.
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
ROWS_PER_FILE = 10_000


def build_source(rows: int, dest: Path) -> Path:
    """A Parquet captions source of ``rows`` rows under ``dest`` (Hub layout); returns its folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ovseg_mine.resources import sample_dir

    coco = REPO.parent / "shared" / "data" / "coco-mini"
    if (coco / "annotations" / "captions_val2017.json").is_file():
        captions_json, images = coco / "annotations" / "captions_val2017.json", coco / "val2017"
    else:
        captions_json, images = sample_dir() / "captions.json", sample_dir() / "images"
    data = json.loads(captions_json.read_text(encoding="utf-8"))
    files = {im["id"]: str(images / im["file_name"]) for im in data["images"]}
    pairs = [(files[a["image_id"]], a["caption"]) for a in data["annotations"] if a["image_id"] in files]
    folder = dest / f"parquet_{rows}"
    (folder / "data").mkdir(parents=True)
    count = (rows + ROWS_PER_FILE - 1) // ROWS_PER_FILE
    for index in range(count):
        n = min(ROWS_PER_FILE, rows - index * ROWS_PER_FILE)
        start = index * ROWS_PER_FILE
        chosen = [pairs[(start + k) % len(pairs)] for k in range(n)]
        table = pa.table({"image": [p for p, _ in chosen], "caption": [c for _, c in chosen]})
        pq.write_table(table, folder / "data" / f"train-{index:05d}-of-{count:05d}.parquet")
    return folder


def driver(location: str, stages: str) -> None:
    """The child process: plan, read (and nouns) on a local Ray, every result back in this process."""
    import ray

    from ovseg_mine.config import build_config
    from ovseg_mine.mine.graph.dataset import init_ray
    from ovseg_mine.mine.graph.stages import NounStage
    from ovseg_mine.mine.run.inflight import InFlightShards
    from ovseg_mine.mine.sources import MineInput
    from ovseg_mine.mine.sources import build_source as make_source
    from ovseg_mine.mine.sources.read import records_dataset

    what = MineInput("hf", location)
    cfg = what.configure(build_config("smoke"))
    source = make_source(cfg, what)
    start = time.perf_counter()
    plan = source.plan(cfg.shards.images_per_shard)
    plan_s = time.perf_counter() - start
    init_ray(None)
    start = time.perf_counter()
    ds = records_dataset(source, plan.tasks)
    if stages == "nouns":
        from ray.data import ActorPoolStrategy

        ds = ds.map_batches(
            NounStage,
            fn_constructor_kwargs={"cfg": cfg},
            batch_size=64,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=2),
            num_cpus=0.5,
        )
    inflight = InFlightShards()
    rows = shards = nouns = 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for result in batch.to_pylist():
            if inflight.add(result):
                rows += 1
                nouns += len(result.get("nouns") or [])
                if inflight.pop_complete(result["shard"]) is not None:
                    shards += 1
    wall = time.perf_counter() - start
    ray.shutdown()
    figures = {"rows": rows, "shards": shards, "nouns": nouns, "plan_s": round(plan_s, 2), "stream_s": round(wall, 1)}
    print(json.dumps(figures | {"rows_per_s": round(rows / wall, 1)}))


def measure(location: Path, stages: str, interval_s: float = 0.2) -> dict:
    """Run :func:`driver` in a child process while sampling its memory; returns the figures."""
    command = [sys.executable, __file__, "--driver", str(location), "--stages", stages]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak_driver = peak_tree = 0
    while proc.poll() is None:
        try:
            processes = [root, *root.children(recursive=True)]
            sizes = {p.pid: p.memory_info().rss for p in processes if p.is_running()}
        except psutil.Error:
            sizes = {}
        peak_driver = max(peak_driver, sizes.get(root.pid, 0))
        peak_tree = max(peak_tree, sum(sizes.values()))
        time.sleep(interval_s)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"driver failed (rc {proc.returncode}):\n{stderr[-3000:]}")
    figures = json.loads(stdout.strip().splitlines()[-1])
    peaks = {"peak_driver_rss_mib": round(peak_driver / 2**20, 1), "peak_tree_rss_mib": round(peak_tree / 2**20, 1)}
    return figures | peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--stages", nargs="+", choices=["read", "nouns"], default=["read", "nouns"])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "source_memory.json")
    parser.add_argument("--driver", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        driver(args.driver, args.stages[0])
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            location = build_source(rows, Path(tmp))
            for stages in args.stages:
                name = f"{stages}_{rows}"
                results[name] = measure(location, stages)
                print(f"{name}: {results[name]}", flush=True)
    report = {
        "machine": {"cpus": psutil.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
        "load_average": [round(x, 2) for x in psutil.getloadavg()],
        "rows_per_file": ROWS_PER_FILE,
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\n{'run':>14} {'rows':>9} {'rows/s':>9} {'driver MiB':>11} {'tree MiB':>9}")
    for name, r in results.items():
        driver_mib, tree_mib = r["peak_driver_rss_mib"], r["peak_tree_rss_mib"]
        print(f"{name:>14} {r['rows']:>9} {r['rows_per_s']:>9} {driver_mib:>11} {tree_mib:>9}")
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
