"""Quality figures of a run folder (``ovseg-mine inspect``): counts, score distributions, nouns, duplicate
masks and, given COCO instance or panoptic annotations (:class:`ovseg_mine.groundtruth.GroundTruth`), agreement
with the ground truth.

:func:`inspect_run` computes everything into an :class:`Inspection` whose ``figures`` dict is what
``--json`` prints; :func:`format_summary` renders it as text. The HTML report is :mod:`ovseg_mine.inspect.report`.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ovseg_mine import rle
from ovseg_mine.done_record import DoneRecord, ImageStatus
from ovseg_mine.groundtruth import GroundTruth, GroundTruthError
from ovseg_mine.inspect.synonyms import NounMapper
from ovseg_mine.shards import ShardError, read_file_metadata, read_manifest, read_table
from ovseg_mine.stats import QUANTILES, summarize
from ovseg_mine.storage import Location, StorageError, resolve
from ovseg_mine.verify import DamagedShard, verify_shards

SCORES = ("similarity", "probability", "margin", "area_fraction", "predicted_iou", "stability_score")
BIN_SCORES = ("similarity", "probability", "margin")
DUPLICATE_IOU = 0.9
GT_IOU = 0.5


class InspectError(ValueError):
    """A run folder or ground-truth file that cannot be inspected; the message says why, in one line."""


@dataclass
class Inspection:
    """Result of :func:`inspect_run`.

    Attributes:
        run_dir: the run folder (a local path or a URI, resolved).
        manifest: its manifest.json.
        pairs: list of row dicts (pairs-v1 columns plus ``area_fraction``), in shard order.
        gt_iou: float64 ``[len(pairs)]``, IoU with the ground truth, NaN where not evaluated.
        gt_category: per pair the mapped COCO category name, or None.
        figures: the JSON-able figures (see :func:`format_summary`).
    """

    run_dir: Location
    manifest: dict[str, Any]
    pairs: list[dict[str, Any]]
    gt_iou: np.ndarray
    gt_category: list[str | None]
    figures: dict[str, Any] = field(default_factory=dict)


def _num(x: float | None, digits: int = 4) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return round(float(x), digits)


def quantiles(values: Any) -> dict[str, Any]:
    """Summary of a 1-D sample: ``n``, ``nulls`` (None/NaN left out), ``mean``, ``min``, ``p5`` .. ``p95``, ``max``.

    Args:
        values: iterable of numbers, None allowed. Statistics are None when nothing is left; rounded to 4 digits.
    """
    s = summarize(values)
    levels = s.quantiles or [None] * len(QUANTILES)
    return {
        "n": s.n,
        "nulls": s.nulls,
        "mean": _num(s.mean),
        "min": _num(s.min),
        **{f"p{int(q * 100)}": _num(v) for q, v in zip(QUANTILES, levels, strict=True)},
        "max": _num(s.max),
    }


@dataclass
class LoadedRun:
    """What :func:`load_run` read.

    Attributes:
        manifest: the run's manifest.json.
        pairs: row dicts of the verified shards, in shard order: the pairs-v1 columns (``mask`` a COCO RLE dict,
            ``bbox`` XYWH pixels) plus ``area_fraction``: float, mask area / image pixels, in [0, 1].
        done: the verified shards' done records, by shard index.
        damaged: the shards left out with ``skip_damaged`` (:class:`ovseg_mine.verify.DamagedShard`).
    """

    manifest: dict[str, Any]
    pairs: list[dict[str, Any]]
    done: dict[int, DoneRecord]
    damaged: list[DamagedShard]


def load_run(run_dir: str | Path | Location, *, skip_damaged: bool = False) -> LoadedRun:
    """Read a run folder, every shard checked against its done marker first
    (:func:`ovseg_mine.verify.verify_shards`: the file's sha256 streamed once).

    Args:
        run_dir: the run folder, a local path or a URI.
        skip_damaged: leave damaged shards out (listed in the result) instead of refusing the run.

    Raises:
        InspectError: not a run folder (no manifest.json or shards/), unreadable manifest, a damaged shard
            (without ``skip_damaged``; the message names it), or a shard that is not an ovseg-mine shard or uses
            an unknown schema version.
    """
    try:
        manifest = read_manifest(run_dir)
        checked = verify_shards(run_dir, skip_damaged=skip_damaged)
        for path in checked.files:
            read_file_metadata(path)
        tables = [read_table(path).replace_schema_metadata(None) for path in checked.files]
    except ShardError as exc:
        raise InspectError(str(exc)) from exc
    rows = [row for table in tables for row in table.to_pylist()]
    for row in rows:
        row["area_fraction"] = row["area"] / max(1, row["width"] * row["height"])
    return LoadedRun(manifest, rows, checked.records, checked.damaged)


def _image_records(done: dict[int, DoneRecord], pairs: list[dict[str, Any]]) -> list[ImageStatus]:
    images = [img for index in sorted(done) for img in done[index].images]
    known = {img.image_id for img in images}
    by_image: dict[int, list[dict]] = defaultdict(list)
    for p in pairs:
        by_image[p["image_id"]].append(p)
    for image_id, rows in by_image.items():  # shards without per-image status (hand-made or older runs)
        if image_id not in known:
            images.append(ImageStatus(image_id, "ok", num_pairs=len(rows), num_proposals=rows[0]["num_proposals"]))
    return images


def _counts(manifest: dict[str, Any], pairs: list[dict[str, Any]], images: list[ImageStatus]) -> dict[str, Any]:
    without = [img for img in images if not img.num_pairs]
    reasons = Counter(f"{img.status}: {img.reason or 'no pair'}" for img in without)
    source_rejects = [r for r in manifest.get("rejects", []) if r.get("stage") == "source"]
    return {
        "images": len(images),
        "images_with_pairs": len(images) - len(without),
        "images_without_pairs": len(without),
        "images_without_pairs_by_stage": dict(Counter(img.status for img in without).most_common()),
        "images_without_pairs_by_reason": dict(reasons.most_common()),
        "source_rejects": len(source_rejects),
        "pairs": len(pairs),
        "unique_nouns": len({p["noun"] for p in pairs}),
        "pairs_per_image": quantiles(img.num_pairs for img in images),
        "masks_per_image": quantiles(img.num_proposals for img in images),
    }


def _nouns(pairs: list[dict[str, Any]], top: int) -> dict[str, Any]:
    counts = Counter(p["noun"] for p in pairs)
    once = sum(1 for c in counts.values() if c == 1)
    return {
        "top": [[n, c] for n, c in counts.most_common(top)],
        "unique": len(counts),
        "occurring_once": once,
        "occurring_once_fraction": _num(once / len(counts)) if counts else None,
    }


def _group(pairs: list[dict[str, Any]]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        groups[p["image_id"]].append(i)
    return groups


def _duplicates(pairs: list[dict[str, Any]], threshold: float = DUPLICATE_IOU) -> dict[str, Any]:
    found, involved, images = [], set(), set()
    for image_id, idx in _group(pairs).items():
        if len(idx) < 2:
            continue
        ious = rle.iou([pairs[i]["mask"] for i in idx], [pairs[i]["mask"] for i in idx])
        a, b = np.nonzero(np.triu(ious >= threshold, k=1))
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            i, j = idx[x], idx[y]
            if pairs[i]["noun"] != pairs[j]["noun"]:
                found.append(
                    {"image_id": image_id, "nouns": [pairs[i]["noun"], pairs[j]["noun"]], "iou": _num(ious[x, y])}
                )
                involved.update((i, j))
                images.add(image_id)
    return {
        "iou_threshold": threshold,
        "mask_pairs": len(found),
        "pairs_involved": len(involved),
        "pairs_involved_fraction": _num(len(involved) / len(pairs)) if pairs else None,
        "images": len(images),
        "examples": found[:10],
    }


def _agreement(ious: np.ndarray) -> dict[str, Any]:
    return {
        "pairs": int(ious.size),
        "precision": _num((ious >= GT_IOU).mean()) if ious.size else None,
        "mean_iou": _num(ious.mean()) if ious.size else None,
    }


def _score_bins(pairs: list[dict[str, Any]], ious: np.ndarray, done: np.ndarray, score: str) -> list[dict[str, Any]]:
    vals = np.asarray([np.nan if pairs[i][score] is None else pairs[i][score] for i in np.nonzero(done)[0]])
    iou_e = ious[done]
    keep = np.isfinite(vals)
    vals, iou_e = vals[keep], iou_e[keep]
    if not vals.size:
        return []
    edges = np.unique(np.quantile(vals, [0, 0.25, 0.5, 0.75, 0.9, 1.0]))
    rows = []
    for k, lo in enumerate(edges[:-1] if edges.size > 1 else edges):
        hi = edges[k + 1] if k + 1 < edges.size else np.inf
        in_bin = (vals >= lo) & ((vals < hi) | (k + 2 == edges.size))
        above = vals >= lo
        rows.append(
            {
                "from": _num(lo),
                "to": _num(hi) if np.isfinite(hi) else None,
                **_agreement(iou_e[in_bin]),
                "pairs_at_or_above": int(above.sum()),
                "precision_at_or_above": _num((iou_e[above] >= GT_IOU).mean()) if above.any() else None,
                "mean_iou_at_or_above": _num(iou_e[above].mean()) if above.any() else None,
            }
        )
    return rows


def _gt_figures(pairs: list[dict[str, Any]], image_ids: set[int], gt: GroundTruth) -> tuple[dict, np.ndarray, list]:
    overlap = image_ids & set(gt.images)
    if image_ids and not overlap:
        some = ", ".join(str(i) for i in sorted(image_ids)[:3])
        raise InspectError(
            f"ground truth {gt.path} has none of the run's {len(image_ids)} image ids (e.g. {some}): "
            "is it the annotation file of the same split?"
        )
    mapper = NounMapper(gt.categories)
    ious = np.full(len(pairs), np.nan)
    cats: list[str | None] = [None] * len(pairs)
    status: Counter[str] = Counter()
    unmapped: Counter[str] = Counter()
    todo: dict[int, list[tuple[int, int]]] = defaultdict(list)  # image id -> [(pair index, category id)]
    for i, p in enumerate(pairs):
        cid = mapper.category(p["noun"])
        if cid is None:
            status["unmapped"] += 1
            unmapped[p["noun"]] += 1
            continue
        cats[i] = gt.categories[cid]
        if p["image_id"] not in gt.images:
            status["image_not_in_gt"] += 1
            continue
        union = gt.category_masks(p["image_id"]).get(cid)
        if union is None:
            status["category_absent"] += 1
            continue
        if list(union["size"]) != list(p["mask"]["size"]):
            status["size_mismatch"] += 1
            continue
        todo[p["image_id"]].append((i, cid))
    for image_id, items in todo.items():  # one IoU call per image: its pairs x the categories they map to
        unions = gt.category_masks(image_id)
        column = {cid: k for k, cid in enumerate(dict.fromkeys(cid for _, cid in items))}
        matrix = rle.iou([pairs[i]["mask"] for i, _ in items], [unions[cid] for cid in column])
        for row, (i, cid) in enumerate(items):
            ious[i] = matrix[row, column[cid]]
    done = np.isfinite(ious)
    per_cat: dict[str, list[float]] = defaultdict(list)
    for i in np.nonzero(done)[0]:
        per_cat[cats[i]].append(float(ious[i]))
    figures = {
        "file": str(gt.path),
        "kind": gt.kind,
        "iou_threshold": GT_IOU,
        "images_in_run": len(image_ids),
        "images_with_gt": len(overlap),
        "pairs": len(pairs),
        "unmapped": status["unmapped"],
        "unmapped_fraction": _num(status["unmapped"] / len(pairs)) if pairs else None,
        "top_unmapped": [[n, c] for n, c in unmapped.most_common(10)],
        "category_absent": status["category_absent"],
        "image_not_in_gt": status["image_not_in_gt"],
        "size_mismatch": status["size_mismatch"],
        "evaluated": int(done.sum()),
        **{k: v for k, v in _agreement(ious[done]).items() if k != "pairs"},
        "per_category": sorted(
            ({"category": c, **_agreement(np.asarray(v))} for c, v in per_cat.items()),
            key=lambda r: (-r["pairs"], r["category"]),
        ),
        "by_score": {s: _score_bins(pairs, ious, done, s) for s in BIN_SCORES},
    }
    return figures, ious, cats


def inspect_run(
    run_dir: str | Path | Location, gt_path: str | Path | None = None, *, top: int = 20, skip_damaged: bool = False
) -> Inspection:
    """Compute the quality figures of a run folder.

    Args:
        run_dir: a run folder (manifest.json + shards/): a local path or a URI (``s3://``, ``gs://``...).
        gt_path: optional COCO instance or panoptic annotations of the same images.
        top: how many top nouns to list.
        skip_damaged: leave shards whose file and done marker disagree out, listed in ``figures["damaged_shards"]``
            (``[{"file", "kind", "reason"}]``), instead of refusing the run.

    Returns:
        An :class:`Inspection`; ``figures`` has keys run, status, weights, damaged_shards, counts, distributions,
        nouns, duplicates and gt (None without ``gt_path``). Mask areas are fractions of the image area; IoUs in [0, 1].

    Raises:
        InspectError: see :func:`load_run`; a ground truth that cannot be read (:class:`GroundTruth`) or that
            shares no image id with the run.
    """
    try:
        run_dir = resolve(run_dir)
    except StorageError as exc:
        raise InspectError(str(exc)) from exc
    loaded = load_run(run_dir, skip_damaged=skip_damaged)
    manifest, pairs = loaded.manifest, loaded.pairs
    images = _image_records(loaded.done, pairs)
    figures: dict[str, Any] = {
        "run": run_dir.uri,
        "status": manifest.get("status"),
        "weights": manifest.get("weights"),
        "damaged_shards": [{"file": d.name, "kind": d.kind, "reason": d.reason} for d in loaded.damaged],
        "counts": _counts(manifest, pairs, images),
        "distributions": {s: quantiles(p[s] for p in pairs) for s in SCORES},
        "nouns": _nouns(pairs, top),
        "duplicates": _duplicates(pairs),
        "gt": None,
    }
    ious, cats = np.full(len(pairs), np.nan), [None] * len(pairs)
    if gt_path is not None:
        try:
            gt = GroundTruth(gt_path)
            figures["gt"], ious, cats = _gt_figures(pairs, {int(img.image_id) for img in images}, gt)
        except GroundTruthError as exc:
            raise InspectError(str(exc)) from exc
    return Inspection(run_dir, manifest, pairs, ious, cats, figures)


def _q(d: dict[str, Any]) -> str:
    if not d["n"]:
        return "n=0"
    fmt = lambda v: f"{v:.3g}"  # noqa: E731
    text = (
        f"n={d['n']} mean={fmt(d['mean'])} min={fmt(d['min'])} p5={fmt(d['p5'])} p25={fmt(d['p25'])} "
        f"p50={fmt(d['p50'])} p75={fmt(d['p75'])} p95={fmt(d['p95'])} max={fmt(d['max'])}"
    )
    return text + (f" (null {d['nulls']})" if d["nulls"] else "")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_summary(figures: dict[str, Any]) -> str:
    """The figures of :func:`inspect_run` as plain text (several lines, no trailing newline)."""
    c, n, d = figures["counts"], figures["nouns"], figures["duplicates"]
    damaged = figures.get("damaged_shards") or []
    lines = [
        f"run {figures['run']} ({figures['status']}, weights {figures['weights']})",
        *([f"skipped {len(damaged)} damaged shard(s); their images and pairs are not counted:"] if damaged else []),
        *(f"  {d['file']}: {d['reason']}" for d in damaged),
        f"images: {c['images']} ({c['images_with_pairs']} with pairs, {c['images_without_pairs']} without)"
        + (f"; {c['source_rejects']} not read from the source" if c["source_rejects"] else ""),
    ]
    lines += [f"  no pair, {reason}: {k}" for reason, k in c["images_without_pairs_by_reason"].items()]
    lines += [
        f"pairs: {c['pairs']}, unique nouns: {c['unique_nouns']}",
        f"pairs per image: {_q(c['pairs_per_image'])}",
        f"masks per image: {_q(c['masks_per_image'])}",
        "distributions:",
    ]
    lines += [f"  {s:16s} {_q(q)}" for s, q in figures["distributions"].items()]
    lines.append("top nouns: " + ", ".join(f"{w} {k}" for w, k in n["top"]))
    lines.append(
        f"long tail: {n['occurring_once']} of {n['unique']} nouns occur once ({_pct(n['occurring_once_fraction'])})"
    )
    lines.append(
        f"duplicate masks (IoU >= {d['iou_threshold']}, different nouns, same image): {d['mask_pairs']} mask pairs "
        f"in {d['images']} images, {d['pairs_involved']} pairs involved ({_pct(d['pairs_involved_fraction'])})"
    )
    g = figures.get("gt")
    if g:
        lines += [
            f"ground truth ({g['kind']}, {g['file']}): {g['images_with_gt']}/{g['images_in_run']} images annotated",
            f"  pairs evaluated: {g['evaluated']} of {g['pairs']}; unmapped noun: {g['unmapped']} "
            f"({_pct(g['unmapped_fraction'])}); category not in image: {g['category_absent']}; "
            f"image not annotated: {g['image_not_in_gt']}",
            f"  precision@IoU>={g['iou_threshold']}: {_pct(g['precision'])}, mean IoU: "
            + ("n/a" if g["mean_iou"] is None else f"{g['mean_iou']:.3f}"),
        ]
        if g["top_unmapped"]:
            lines.append("  top unmapped nouns: " + ", ".join(f"{w} {k}" for w, k in g["top_unmapped"]))
        lines.append(
            f"  per category ({min(15, len(g['per_category']))} of {len(g['per_category'])}, most pairs first):"
        )
        for r in g["per_category"][:15]:
            lines.append(
                f"    {r['category']:16s} pairs {r['pairs']:5d}  precision {_pct(r['precision']):>6s}  "
                f"mean IoU {r['mean_iou']:.3f}"
            )
        for score, rows in g["by_score"].items():
            lines.append(f"  by {score} (threshold: pairs kept, precision, mean IoU):")
            lines += [
                f"    >= {r['from']:<8.3g} {r['pairs_at_or_above']:5d}  {_pct(r['precision_at_or_above']):>6s}  "
                f"{r['mean_iou_at_or_above']:.3f}"
                for r in rows
            ]
    return "\n".join(lines)
