"""The HTML report of ``ovseg-mine inspect``: one self-contained page (plots and gallery images embedded as
data URIs; no network, no external script) with the figures of :mod:`ovseg_mine.inspect.quality`, score plots, and a
gallery of sampled pairs (image with the mask drawn over it, the masked crop, noun, caption, scores, and the
ground-truth IoU where known). Every caption and noun is escaped.
"""

from __future__ import annotations

import base64
import io
import random
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from ovseg_mine.inspect.quality import SCORES, Inspection
from ovseg_mine.storage import Location, StorageError, resolve

THUMB = 320  # longest side of a gallery image, pixels
CROP = 160  # side of a gallery crop, pixels

_CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222;background:#fafafa}
table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}img.plot{max-width:100%;border:1px solid #ddd;background:#fff}
#gallery{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;border:1px solid #ccc;padding:6px;width:500px}
.card img{vertical-align:top;margin-right:4px}.noun{font-weight:bold;font-size:1.1em}.cap{color:#555;font-style:italic}
.warn{background:#fff3cd;padding:6px;border:1px solid #e0c060}.controls{margin:.5em 0}
"""

_JS = """
(function(){
  var g=document.getElementById('gallery'); if(!g){return;}
  var cards=Array.prototype.slice.call(g.querySelectorAll('.card'));
  var q=document.getElementById('f-noun'), s=document.getElementById('f-sort'), m=document.getElementById('f-min');
  function num(c,k){var v=parseFloat(c.getAttribute('data-'+k));return isNaN(v)?-Infinity:v;}
  function update(){
    var text=q.value.trim().toLowerCase(), key=s.value, min=parseFloat(m.value), shown=0;
    cards.sort(function(a,b){return key==='noun'
      ?a.getAttribute('data-noun').localeCompare(b.getAttribute('data-noun')):num(b,key)-num(a,key);});
    cards.forEach(function(c){
      var ok=c.getAttribute('data-noun').indexOf(text)>=0 && (isNaN(min)||key==='noun'||num(c,key)>=min);
      c.style.display=ok?'':'none'; if(ok){shown++;} g.appendChild(c);
    });
    document.getElementById('f-count').textContent=shown+' of '+cards.length+' shown';
  }
  [q,s,m].forEach(function(e){e.addEventListener('input',update);});
  update();
})();
"""


def _data_uri(image: Any, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=85) if fmt == "JPEG" else image.save(buf, format=fmt)
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _figure_uri(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def plots(insp: Inspection) -> dict[str, str]:
    """Matplotlib (Agg) plots as PNG data URIs: ``distributions``, ``nouns`` and, with ground truth, ``precision``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, score in zip(axes.ravel(), SCORES, strict=True):
        vals = np.asarray([p[score] for p in insp.pairs if p[score] is not None], dtype=np.float64)
        ax.hist(vals, bins=30, color="#4477aa") if vals.size else ax.text(0.5, 0.5, "no data", ha="center")
        ax.set_title(score + (" (of image area)" if score == "area_fraction" else ""))
        ax.set_ylabel("pairs")
    fig.tight_layout()
    out["distributions"] = _figure_uri(fig)
    top = insp.figures["nouns"]["top"]
    fig, ax = plt.subplots(figsize=(12, 3.5))
    ax.bar([w for w, _ in top], [k for _, k in top], color="#228833")
    ax.set_ylabel("pairs")
    ax.set_title("top nouns")
    ax.tick_params(axis="x", rotation=60)
    out["nouns"] = _figure_uri(fig)
    gt = insp.figures.get("gt")
    if gt and gt["evaluated"]:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        for ax, (score, rows) in zip(axes, gt["by_score"].items(), strict=True):
            ax.plot([r["from"] for r in rows], [r["precision_at_or_above"] for r in rows], "o-", label="precision")
            ax.plot([r["from"] for r in rows], [r["mean_iou_at_or_above"] for r in rows], "s--", label="mean IoU")
            ax.set_xlabel(f"{score} threshold (pairs kept: >=)")
            ax.set_ylim(0, 1)
            ax.legend()
        fig.tight_layout()
        out["precision"] = _figure_uri(fig)
    return out


def _pair_images(image: np.ndarray, mask_rle: dict[str, Any]) -> tuple[str, str]:
    from PIL import Image

    from ovseg_mine import rle
    from ovseg_mine.crops import masked_crop_images

    mask = rle.decode(mask_rle)
    if mask.shape != image.shape[:2] or not mask.any():
        raise ValueError("mask does not fit the image")
    overlay = image.astype(np.float32)
    overlay[mask] = 0.45 * overlay[mask] + 0.55 * np.array([255, 40, 40], dtype=np.float32)
    edge = mask ^ np.pad(mask, 1, mode="edge")[2:, 1:-1] | mask ^ np.pad(mask, 1, mode="edge")[1:-1, 2:]
    overlay[edge] = (255, 255, 0)
    over = Image.fromarray(overlay.clip(0, 255).astype(np.uint8))
    over.thumbnail((THUMB, THUMB))
    crop_img = Image.fromarray(masked_crop_images(image, mask[None], size=CROP)[0])
    return _data_uri(over), _data_uri(crop_img)


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def gallery_html(insp: Inspection, n: int, seed: int) -> str:
    """HTML of ``n`` pairs sampled with ``random.Random(seed)`` (repeatable), as ``.card`` divs in ``#gallery``."""
    from ovseg_mine.images import ImageDecodeError, load_rgb

    picked = sorted(random.Random(seed).sample(range(len(insp.pairs)), min(n, len(insp.pairs))))
    root = insp.manifest.get("source", {}).get("image_root", "") or "."
    cache: dict[int, np.ndarray | None] = {}
    cards = []
    for i in picked:
        p = insp.pairs[i]
        if p["image_id"] not in cache:
            try:
                cache[p["image_id"]] = load_rgb(resolve(root).join(p["file_name"]).uri)
            except (ImageDecodeError, StorageError):
                cache[p["image_id"]] = None
        image, pictures = cache[p["image_id"]], "<p class='warn'>image not found under the run's image root</p>"
        if image is not None:
            try:
                over, crop = _pair_images(image, p["mask"])
                pictures = f"<img src='{over}' alt='mask over image'><img src='{crop}' alt='masked crop'>"
            except ValueError:
                pictures = "<p class='warn'>mask does not fit the image</p>"
        iou = insp.gt_iou[i]
        cat = insp.gt_category[i]
        if insp.figures.get("gt") is None:
            gt_text = "no ground truth given"
        elif np.isfinite(iou):
            gt_text = f"GT IoU {_fmt(float(iou))} ({escape(cat or '')})"
        else:
            gt_text = f"GT: {escape(cat)}, not scored (not in the image)" if cat else "GT: noun maps to no category"
        attrs = " ".join(
            f"data-{k}='{_fmt(p[k]) if p[k] is not None else ''}'" for k in ("similarity", "probability", "margin")
        )
        cards.append(
            f"<div class='card' data-noun='{escape(p['noun'])}' {attrs} "
            f"data-gtiou='{_fmt(float(iou)) if np.isfinite(iou) else ''}'>"
            f"{pictures}<div class='noun'>{escape(p['noun'])}</div><div class='cap'>{escape(p['caption'])}</div>"
            f"<div>image {p['image_id']} ({escape(p['file_name'])}) &middot; "
            f"similarity {_fmt(p['similarity'])} &middot; "
            f"probability {_fmt(p['probability'])} &middot; margin {_fmt(p['margin'])} &middot; predicted_iou "
            f"{_fmt(p['predicted_iou'])} &middot; stability {_fmt(p['stability_score'])} &middot; area "
            f"{100 * p['area_fraction']:.1f}% &middot; {gt_text}</div></div>"
        )
    controls = (
        "<div class='controls'>noun <input id='f-noun' type='search'> sort by <select id='f-sort'>"
        + "".join(f"<option value='{k}'>{k}</option>" for k in ("similarity", "probability", "margin", "gtiou", "noun"))
        + "</select> minimum <input id='f-min' type='number' step='0.01'> <span id='f-count'></span></div>"
    )
    return controls + "<div id='gallery'>" + "".join(cards) + "</div>"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any, tag: str) -> str:
        cls = " class='l'" if isinstance(v, str) else ""
        return f"<{tag}{cls}>{escape(_fmt(v) if isinstance(v, float) else str(v))}</{tag}>"

    return (
        "<table><tr>"
        + "".join(cell(h, "th") for h in head)
        + "</tr>"
        + "".join("<tr>" + "".join(cell(v, "td") for v in r) + "</tr>" for r in rows)
        + "</table>"
    )


def _quantile_rows(named: dict[str, dict[str, Any]]) -> str:
    keys = ["n", "nulls", "mean", "min", "p5", "p25", "p50", "p75", "p95", "max"]
    return _table(["", *keys], [[name, *[("" if q[k] is None else q[k]) for k in keys]] for name, q in named.items()])


def render_html(insp: Inspection, *, gallery: int = 48, seed: int = 0) -> str:
    """The whole report page as a string (see the module docstring)."""
    f, c = insp.figures, insp.figures["counts"]
    pics = plots(insp)
    parts = [
        f"<h1>ovseg-mine report: {escape(f['run'])}</h1><p>"
        + " &middot; ".join(
            f"<a href='#{k}'>{k.removesuffix('-h')}</a>"
            for k in ("counts", "distributions", "nouns", "duplicates", "ground-truth", "gallery-h")
            if k != "ground-truth" or f.get("gt")
        )
        + "</p>"
    ]
    if f["weights"] == "random":
        parts.append("<p class='warn'>This run used randomly initialised weights: its pairs are meaningless.</p>")
    if f.get("damaged_shards"):
        parts.append(
            f"<p class='warn'>{len(f['damaged_shards'])} damaged shard(s) skipped (--skip-damaged); their images and "
            "pairs are not counted here:</p>"
            + _table(["shard", "reason"], [[d["file"], d["reason"]] for d in f["damaged_shards"]])
        )
    parts += [
        "<h2 id='counts'>Counts</h2>",
        _table(
            ["", "value"],
            [
                ["status", str(f["status"])],
                ["images", c["images"]],
                ["images with pairs", c["images_with_pairs"]],
                ["images without pairs", c["images_without_pairs"]],
                ["not read from the source", c["source_rejects"]],
                ["pairs", c["pairs"]],
                ["unique nouns", c["unique_nouns"]],
            ],
        ),
    ]
    if c["images_without_pairs_by_reason"]:
        parts.append(
            _table(["why no pair", "images"], [[r, k] for r, k in c["images_without_pairs_by_reason"].items()])
        )
    parts += [
        _quantile_rows({"pairs per image": c["pairs_per_image"], "masks per image": c["masks_per_image"]}),
        "<h2 id='distributions'>Distributions</h2>",
        _quantile_rows(f["distributions"]),
        f"<img class='plot' src='{pics['distributions']}' alt='score histograms'>",
        "<h2 id='nouns'>Nouns</h2>",
        f"<img class='plot' src='{pics['nouns']}' alt='top nouns'>",
        f"<p>{f['nouns']['occurring_once']} of {f['nouns']['unique']} nouns occur once (the long tail).</p>",
        _table(["noun", "pairs"], f["nouns"]["top"]),
    ]
    d = f["duplicates"]
    parts += [
        "<h2 id='duplicates'>Duplicate masks</h2>",
        f"<p>{d['mask_pairs']} mask pairs with IoU &ge; {d['iou_threshold']} under different nouns in "
        f"{d['images']} images ({d['pairs_involved']} pairs involved).</p>",
        _table(["image", "nouns", "IoU"], [[e["image_id"], " / ".join(e["nouns"]), e["iou"]] for e in d["examples"]]),
    ]
    g = f.get("gt")
    if g:
        parts += [
            f"<h2 id='ground-truth'>Agreement with ground truth ({escape(g['kind'])})</h2>",
            _table(
                ["", "value"],
                [
                    ["file", g["file"]],
                    ["images annotated", f"{g['images_with_gt']} / {g['images_in_run']}"],
                    ["pairs evaluated", g["evaluated"]],
                    ["unmapped noun", g["unmapped"]],
                    ["unmapped fraction", g["unmapped_fraction"] or 0.0],
                    ["category not in image", g["category_absent"]],
                    [
                        f"precision at IoU >= {g['iou_threshold']}",
                        g["precision"] if g["precision"] is not None else "n/a",
                    ],
                    ["mean IoU", g["mean_iou"] if g["mean_iou"] is not None else "n/a"],
                ],
            ),
        ]
        if "precision" in pics:
            parts.append(f"<img class='plot' src='{pics['precision']}' alt='precision by threshold'>")
        for score, rows in g["by_score"].items():
            parts += [
                f"<h3>by {escape(score)}</h3>",
                _table(
                    [
                        "from",
                        "to",
                        "pairs in bin",
                        "precision in bin",
                        "mean IoU in bin",
                        "pairs ≥ from",
                        "precision",
                        "mean IoU",
                    ],
                    [
                        [
                            r["from"],
                            r["to"] if r["to"] is not None else "",
                            r["pairs"],
                            r["precision"],
                            r["mean_iou"],
                            r["pairs_at_or_above"],
                            r["precision_at_or_above"],
                            r["mean_iou_at_or_above"],
                        ]
                        for r in rows
                    ],
                ),
            ]
        parts += [
            "<h3>per category</h3>",
            _table(
                ["category", "pairs", "precision", "mean IoU"],
                [[r["category"], r["pairs"], r["precision"], r["mean_iou"]] for r in g["per_category"]],
            ),
        ]
    parts += [
        f"<h2 id='gallery-h'>Gallery ({min(gallery, len(insp.pairs))} sampled pairs, seed {seed})</h2>",
        gallery_html(insp, gallery, seed),
    ]
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>ovseg-mine report</title>"
        f"<style>{_CSS}</style></head><body>{''.join(parts)}<script>{_JS}</script></body></html>"
    )


def write_report(insp: Inspection, out_dir: str | Path | Location, *, gallery: int = 48, seed: int = 0) -> Location:
    """Write ``out_dir/index.html`` (a local folder, created, or a URI) and return where it is. ``gallery``: pairs
    shown; ``seed``: sampling.

    Raises:
        OSError: the folder or the file cannot be written (:class:`ovseg_mine.storage.StorageError` for a URI).
    """
    path = resolve(out_dir).join("index.html")
    path.write_text(render_html(insp, gallery=gallery, seed=seed))
    return path
