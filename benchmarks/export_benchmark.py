"""Export speed: pairs/s of ``export --format openclip-csv`` and ``--format webdataset`` on a mined run.

The run is the 79-image coco-mini sample mined with the smoke recipe (mine it first, about a minute)::

    ovseg-mine mine --captions ../shared/data/coco-mini/annotations/captions_val2017.json \\
        --images ../shared/data/coco-mini/val2017 --out runs/coco79 --pipeline smoke
    python benchmarks/export_benchmark.py runs/coco79 --out benchmarks/results/export.json

Each format is exported ``--repeats`` times into a fresh folder (library calls, one process, no progress bar); the
figure is the best wall time (and, as the machine may be shared, the process's CPU time): shard checks (sha256),
image decoding, masks, crops, PNG encoding and writing. A rerun into the same folder (everything already written)
is timed too: it decodes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time


def _time(export, run: str, out: str) -> tuple[float, float, int, int]:
    started, cpu = time.perf_counter(), time.process_time()
    result = export(run, out)
    return time.perf_counter() - started, time.process_time() - cpu, result.pairs, result.written


def main() -> None:
    from ovseg_mine.export.openclip_csv import export_csv
    from ovseg_mine.export.wds import export_webdataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a mined run folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the results JSON here")
    args = parser.parse_args()
    manifest = json.loads(open(os.path.join(args.run, "manifest.json"), encoding="utf-8").read())
    results = {
        "run": os.path.abspath(args.run),
        "images": manifest.get("counts", {}).get("images_with_pairs"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_before": os.getloadavg()[0]},
        "formats": {},
    }
    for name, export in (("openclip-csv", export_csv), ("webdataset", export_webdataset)):
        times, cpus = [], []
        for _ in range(args.repeats):
            folder = tempfile.mkdtemp(prefix=f"export-{name}-")
            try:
                seconds, cpu, pairs, written = _time(export, args.run, folder)
                times.append(seconds)
                cpus.append(cpu)
                rerun, _, _, rewritten = _time(export, args.run, folder)
                assert written == pairs and rewritten == 0
            finally:
                shutil.rmtree(folder)
        best = min(times)
        results["formats"][name] = {
            "pairs": pairs,
            "seconds": [round(t, 3) for t in times],
            "pairs_per_s": round(pairs / best, 1),
            "cpu_seconds": [round(t, 3) for t in cpus],
            "pairs_per_cpu_s": round(pairs / min(cpus), 1),
            "rerun_seconds": round(rerun, 3),
        }
        print(
            f"{name}: {pairs} pairs, best {best:.2f} s = {pairs / best:.1f} pairs/s wall, "
            f"{pairs / min(cpus):.1f} pairs per CPU second (one process); rerun {rerun:.2f} s"
        )
    results["machine"]["load_avg_after"] = os.getloadavg()[0]
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2, sort_keys=True)
            handle.write("\n")


if __name__ == "__main__":
    main()
