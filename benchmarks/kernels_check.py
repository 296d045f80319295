"""Same pairs from ``engine.kernels=stock`` and ``fused`` on the benchmark's calibrated models (issue 23: the fused
decoder, selection and crops must give today's pairs, exact up to float rounding).

    python benchmarks/kernels_check.py --images 2 --points-per-side 8 --out benchmarks/results/kernels.json

SAM ViT-B and CLIP ViT-B/16 with seeded random weights, SAM calibrated (``calibration.py``: realistic predicted
IoUs and stability scores, 100 masks kept per image), the first coco-mini images (``OVSEG_MINE_COCO_MINI`` or
``--data``), nouns from spaCy; the stages after nouns run in this process (``harness.StageRunner``), once with
each kernel choice, everything else the same (``--precision``: ``fp32`` by default, so that the comparison is the
kernels' arithmetic, not bf16's rounding). Pairs are compared as ``mine_benchmark.agreement`` does: the same noun
with the same mask RLE, and the largest similarity difference of those.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from calibration import calibrated_checkpoint  # noqa: E402
from harness import StageRunner, bench_config, coco_records, nouns_with_spacy, with_nouns  # noqa: E402
from mine_benchmark import agreement, machine  # noqa: E402


def kernels_check(data: Path, images: int, points: int, precision: str) -> dict[str, Any]:
    """Mine ``images`` coco-mini images with stock and with fused kernels; their pairs compared.

    Returns:
        ``settings``, per kernel choice ``seconds`` (wall, the GPU stage and finalize) and ``pairs``, and
        ``agreement`` (fused against stock: ``pairs_identical`` as a fraction, ``similarity_abs_diff_max``,
        the differing pairs with IoU of the two masks).
    """
    records = coco_records(data / "annotations" / "captions_val2017.json", data / "val2017", images)
    rows = with_nouns(records, nouns_with_spacy(records))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = calibrated_checkpoint("vit_b", str(Path(tmp) / "sam_vit_b_calibrated.pth"))
        report: dict[str, Any] = {"machine": machine(), "settings": {"images": images, "points": points}}
        pairs = {}
        for kernels in ("stock", "fused"):
            runner = StageRunner(bench_config(points, precision, ckpt, [f"engine.kernels='{kernels}'"]))
            start = time.perf_counter()
            results = [runner.run([row])[0][0] for row in rows]  # one image per call, as the CPU's batches
            pairs[kernels] = [r["pairs"] for r in results]
            report[kernels] = {
                "seconds": time.perf_counter() - start,
                "pairs": sum(len(p) for p in pairs[kernels]),
                "masks_per_image": [r["num_proposals"] for r in results],
            }
        report["settings"]["sam"] = runner.cfg.sam.model_dump()
    report["agreement"] = agreement(pairs["stock"], pairs["fused"])
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("OVSEG_MINE_COCO_MINI", "../shared/data/coco-mini"))
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--points-per-side", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels.json"))
    args = parser.parse_args(argv)
    report = kernels_check(Path(args.data), args.images, args.points_per_side, args.precision)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(json.dumps(report["agreement"], indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
