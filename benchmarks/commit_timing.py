"""When a mining run commits its shards: a real `ovseg-mine mine` run (its own local Ray) watched from outside.

The bundled 16-image sample is listed under new ids until the run has ``--images`` images (``copy * 10**7 + id``);
the run mines them with the ``smoke`` recipe (tiny random models, the pipeline's real plumbing) into shards of
``--per-shard`` images. Every 0.2 s the watcher reads the run's done records; a shard's commit time is when its
record first appears. It reports the spread of the commits over the run and the share of the images that a SIGKILL
at 10 %, 25 %, 50 % and 75 % of the wall time would have kept (the images of the shards committed by then).

    python benchmarks/commit_timing.py --images 2000 --per-shard 50 --out benchmarks/results/commit_timing.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ovseg_mine.resources import sample_dir
from ovseg_mine.shards import read_done

POLL_S = 0.2
KILL_AT = (0.10, 0.25, 0.50, 0.75)


def repeated_captions(path: Path, images: int) -> Path:
    """A COCO Captions JSON of the bundled sample's images listed under new ids, ``images`` entries in all."""
    data = json.loads((sample_dir() / "captions.json").read_text())
    base = sorted(data["images"], key=lambda i: i["id"])
    by_image: dict[int, list[dict]] = {}
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(ann["image_id"], []).append(ann)
    entries, annotations = [], []
    for n in range(images):
        image = base[n % len(base)]
        new_id = (n // len(base) + 1) * 10**7 + image["id"]
        entries.append({**image, "id": new_id})
        for ann in by_image.get(image["id"], []):
            annotations.append({**ann, "id": len(annotations) + 1, "image_id": new_id})
    path.write_text(json.dumps({"images": entries, "annotations": annotations}))
    return path


def measure(images: int, per_shard: int, recipe: str) -> dict:
    """Run the CLI and watch its commits; returns the figures (seconds from the process start)."""
    with tempfile.TemporaryDirectory(prefix="commit-timing-") as tmp:
        captions = repeated_captions(Path(tmp) / "captions.json", images)
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "ovseg_mine.cli", "mine", "--pipeline", recipe, "--captions", str(captions)]
        command += ["--images", str(sample_dir() / "images"), "--out", str(out)]
        command += ["--set", f"shards.images_per_shard={per_shard}"]
        started = time.monotonic()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen: dict[int, float] = {}
        sizes: dict[int, int] = {}
        while proc.poll() is None:
            if (out / "config.json").is_file():
                for index, record in read_done(out, verify=False).items():
                    if index not in seen:
                        seen[index] = time.monotonic() - started
                        sizes[index] = len(record["image_ids"])
            time.sleep(POLL_S)
        wall_s = time.monotonic() - started
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"the run failed (exit {proc.returncode}): {stderr[-2000:]}")
        for index, record in read_done(out, verify=False).items():  # committed in the last poll interval
            if index not in seen:
                seen[index], sizes[index] = wall_s, len(record["image_ids"])
        manifest = json.loads((out / "manifest.json").read_text())
    times = sorted(seen.values())
    kept = {
        f"{int(share * 100)}%": round(sum(sizes[i] for i, t in seen.items() if t <= share * wall_s) / images, 4)
        for share in KILL_AT
    }
    return {
        "images": images,
        "images_per_shard": per_shard,
        "shards": len(seen),
        "recipe": recipe,
        "wall_s": round(wall_s, 2),
        "first_commit_s": round(times[0], 2),
        "last_commit_s": round(times[-1], 2),
        "commit_s": [round(t, 2) for t in times],
        "share_of_images_kept_by_a_sigkill_at": kept,
        "images_per_s": manifest["timings"]["images_per_s"],
        "summary": next((line for line in stdout.splitlines() if line.startswith("complete:")), ""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--per-shard", type=int, default=50)
    parser.add_argument("--recipe", default="smoke")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args()
    result = measure(args.images, args.per_shard, args.recipe)
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
