"""The HTML report of ``ovseg-mine inspect``: one self-contained page (plots and gallery images embedded as
data URIs; no network, no external script) with the figures of :mod:`ovseg_mine.inspect.quality`, score plots, and a
gallery of sampled pairs (image with the mask drawn over it, the masked crop, noun, caption, scores, and the
ground-truth IoU where known). Every caption and noun is escaped.

The page is the jinja2 template ``report.html.j2`` next to this module (autoescaping), which includes the gallery's,
``gallery.html.j2``; this module computes what they show (plots, sampled pairs and their pictures).
"""

from __future__ import annotations

import base64
import io
import random
from functools import lru_cache
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ovseg_mine.inspect.quality import SCORES, Inspection
from ovseg_mine.storage import Location, StorageError, resolve

if TYPE_CHECKING:
    import jinja2

TEMPLATES = Path(__file__).parent  # the page (PAGE) includes the gallery (GALLERY)
PAGE = "report.html.j2"
GALLERY = "gallery.html.j2"
THUMB = 320  # longest side of a gallery image, pixels
CROP = 160  # side of a gallery crop, pixels


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
    """A score with 3 decimals, or ``n/a`` for None, NaN and infinities (the templates' filter ``fmt``)."""
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def _escape(value: Any) -> Any:
    """A template value escaped as :func:`html.escape` does it (``'`` -> ``&#x27;``); markup (macros) as it is."""
    from markupsafe import Markup

    return value if hasattr(value, "__html__") else Markup(escape(str(value)))


@lru_cache(maxsize=1)
def _environment() -> "jinja2.Environment":
    """The jinja2 environment of the report's templates (next to this module), autoescaping."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        autoescape=True,
        finalize=_escape,  # the escaping of html.escape, as the report had before its templates
    )
    env.filters["fmt"] = _fmt
    return env


def _gallery_images(insp: Inspection, picked: list[int]) -> dict[int, np.ndarray | None]:
    """The RGB images of the picked pairs by image id; None for one not readable under the run's image root."""
    from ovseg_mine.images import ImageDecodeError, load_rgb

    root = insp.manifest.get("source", {}).get("image_root", "") or "."
    images: dict[int, np.ndarray | None] = {}
    for i in picked:
        p = insp.pairs[i]
        if p["image_id"] not in images:
            try:
                images[p["image_id"]] = load_rgb(resolve(root).join(p["file_name"]).uri)
            except (ImageDecodeError, StorageError):
                images[p["image_id"]] = None
    return images


def _gallery_card(insp: Inspection, i: int, image: np.ndarray | None) -> dict[str, Any]:
    """What gallery.html.j2 shows of pair ``i``: the pair, its pictures (data URIs, None if not drawn), its GT IoU."""
    pair = insp.pairs[i]
    overlay = crop = None
    if image is not None:
        try:
            overlay, crop = _pair_images(image, pair["mask"])
        except ValueError:
            pass  # the template says the mask does not fit the image
    iou = float(insp.gt_iou[i])
    return {
        "pair": pair,
        "image_found": image is not None,
        "overlay": overlay,
        "crop": crop,
        "gt_iou": iou if np.isfinite(iou) else None,
        "gt_category": insp.gt_category[i],
    }


def _gallery_cards(insp: Inspection, n: int, seed: int) -> list[dict[str, Any]]:
    """The cards of ``n`` pairs sampled with ``random.Random(seed)``, in the order of ``insp.pairs``."""
    picked = sorted(random.Random(seed).sample(range(len(insp.pairs)), min(n, len(insp.pairs))))
    images = _gallery_images(insp, picked)
    return [_gallery_card(insp, i, images[insp.pairs[i]["image_id"]]) for i in picked]


def gallery_html(insp: Inspection, n: int, seed: int) -> str:
    """HTML of ``n`` pairs sampled with ``random.Random(seed)`` (repeatable), as ``.card`` divs in ``#gallery``
    (the template ``gallery.html.j2``), after the gallery's controls."""
    template = _environment().get_template(GALLERY)
    return template.render(cards=_gallery_cards(insp, n, seed), gt_given=insp.figures.get("gt") is not None)


def render_html(insp: Inspection, *, gallery: int = 48, seed: int = 0) -> str:
    """The whole report page as a string (see the module docstring): the template ``report.html.j2``.

    Plots are PNG data URIs (:func:`plots`), gallery pictures JPEG data URIs (the image scaled to at most
    :data:`THUMB` pixels a side, the masked crop :data:`CROP` pixels square).

    Args:
        insp: the run's figures and pairs (:func:`ovseg_mine.inspect.quality.inspect_run`).
        gallery: how many pairs the gallery shows (all when the run has fewer).
        seed: seed of the gallery's sampling (``random.Random(seed)``).
    """
    template = _environment().get_template(PAGE)
    return template.render(
        figures=insp.figures,
        plots=plots(insp),
        cards=_gallery_cards(insp, gallery, seed),
        gt_given=insp.figures.get("gt") is not None,
        seed=seed,
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
