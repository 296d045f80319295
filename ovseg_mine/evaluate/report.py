"""What an ``evaluate`` run on a benchmark shows and writes: a text summary, and with ``--out DIR``
``metrics.json`` (the whole result), ``per_class.csv`` (one row per class, a column per model and score) and
``per_class.png`` (per-class IoU, or top-1 accuracy for regions, of every model side by side; matplotlib)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

SEMSEG_KEYS = ("mIoU", "fwIoU", "mACC", "pACC", "mIoU-seen", "mIoU-unseen", "hIoU")
REGION_KEYS = (("top1", "top-1"), ("top5", "top-5"), ("mean_top1", "mean class acc"), ("mean_top5", "mean top-5"))


def _fmt(x: float | None, scale: float = 1.0) -> str:
    return "    -" if x is None else f"{x * scale:6.2f}"


def _per_class(result: dict[str, Any]) -> tuple[list[str], dict[str, dict[str, list[Any]]]]:
    """Class names and, per model, per column (IoU, ACC or n, top1, top5), the values in class order."""
    models = result["models"]
    first = next(iter(models.values()))["metrics"]
    if result["task"] == "regions":
        names = list(first["per_category"])
        for m in models.values():
            names += [n for n in m["metrics"]["per_category"] if n not in names]
        cols = {
            model: {
                col: [m["metrics"]["per_category"].get(n, {}).get(col) for n in names] for col in ("n", "top1", "top5")
            }
            for model, m in models.items()
        }
        return names, cols
    names = list(first["IoU"])
    return names, {
        model: {c: [m["metrics"][c][n] for n in names] for c in ("IoU", "ACC")} for model, m in models.items()
    }


def format_result(result: dict[str, Any]) -> str:
    """A text table: the benchmark, what was skipped, the headline scores of every model."""
    bench = result["benchmark"]
    lines = [
        f"{bench['name']}: {result['images']} images scored of {bench['label_maps']} label maps, "
        f"{bench['num_classes']} classes ({result['task']}); {result['images_per_second']} images/s on "
        f"{result['device']}"
    ]
    for s in result["skipped"]:
        lines.append(f"  skipped {s['file']}: {s['reason']}")
    for s in result.get("no_proposals", []):
        lines.append(f"  no proposal for {s['file']} (all its pixels count as wrong): {s['reason']}")
    models = result["models"]
    lines.append(f"{'':16s}" + "".join(f"{name:>14s}" for name in models))
    if result["task"] == "regions":
        for key, label in REGION_KEYS:
            lines.append(f"{label:16s}" + "".join(f"{_fmt(m['metrics'][key], 100):>14s}" for m in models.values()))
        lines.append(f"{'regions':16s}" + "".join(f"{m['metrics']['masks']:>14d}" for m in models.values()))
        return "\n".join(lines)
    for key in SEMSEG_KEYS:
        if any(key in m["metrics"] for m in models.values()):
            lines.append(f"{key:16s}" + "".join(f"{_fmt(m['metrics'].get(key)):>14s}" for m in models.values()))
    first = next(iter(models.values()))["metrics"]
    if first["pixels"]:
        share = ", ".join(f"{100 * m['metrics']['no_class_pixels'] / first['pixels']:.1f}%" for m in models.values())
        lines.append(f"pixels no proposal covers (counted wrong): {share}")
    return "\n".join(lines)


def write_report(result: dict[str, Any], out: str | os.PathLike[str]) -> list[Path]:
    """Write ``metrics.json``, ``per_class.csv`` and ``per_class.png`` into ``out`` (created); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "metrics.json", out / "per_class.csv", out / "per_class.png"]
    paths[0].write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    names, cols = _per_class(result)
    with paths[1].open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        header = ["class"] + [f"{model} {col}" for model, c in cols.items() for col in c]
        writer.writerow(header)
        for i, name in enumerate(names):
            row = [name]
            for c in cols.values():
                row += [
                    "" if v[i] is None else (round(v[i], 4) if isinstance(v[i], float) else v[i]) for v in c.values()
                ]
            writer.writerow(row)
    key, label = ("top1", "top-1 accuracy (%)") if result["task"] == "regions" else ("IoU", "IoU (%)")
    scale = 100 if result["task"] == "regions" else 1
    shown = [i for i, _ in enumerate(names) if any(c[key][i] is not None for c in cols.values())]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(shown) + 2), 4))
    width = 0.8 / max(1, len(cols))
    for j, (model, c) in enumerate(cols.items()):
        values = [(c[key][i] or 0) * scale for i in shown]
        ax.bar([i + j * width for i in range(len(shown))], values, width=width, label=model)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shown))])
    ax.set_xticklabels([names[i] for i in shown], rotation=90, fontsize=6)
    ax.set_ylabel(label)
    ax.set_title(f"{result['benchmark']['name']}: per-class {label.split(' (')[0]} ({result['task']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    plt.close(fig)
    return paths
