"""The dataset card (README.md) of a published run: YAML header for the Hub and datasets, text from the manifest.

The header declares ``configs`` (one ``default`` config whose ``train`` split is ``data/train-*``) and
``dataset_info`` (features, number of examples, bytes) so that the Hub's viewer and ``datasets.load_dataset``
agree on the schema. The text says what the pairs are, how they were mined, their counts and distributions,
how to load them and render a masked crop, the licenses of the source data, and the OVSeg citation.
Everything here is deterministic (no dates): rebuilding the same run gives the same card.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

DATA_GLOB = "data/train-*"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)

CITATION = """@inproceedings{liang2023open,
  title     = {Open-Vocabulary Semantic Segmentation with Mask-adapted {CLIP}},
  author    = {Liang, Feng and Wu, Bichen and Dai, Xiaoliang and Li, Kunpeng and Zhao, Yinan and
               Zhang, Hang and Zhang, Peizhao and Vajda, Peter and Marculescu, Diana},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2023},
  note      = {arXiv:2210.04150}
}"""

RANDOM_WARNING = (
    "**Warning: these pairs were mined with randomly initialised model weights and are meaningless** "
    "(a smoke test of the pipeline, not training data)."
)


def pair_stats(table: "pa.Table") -> dict[str, Any]:
    """Counts and distributions of a pairs table (columns of ``schemas/pairs-v1.json``).

    Args:
        table: Arrow table with at least ``image_id``, ``noun``, ``width``, ``height``, ``area``,
            ``similarity``, ``probability`` and ``margin`` (nullable).

    Returns:
        ``pairs``, ``images`` (images with at least one pair), ``unique_nouns``, ``pairs_per_image``
        (mean, median, max), ``quantiles`` (column -> list of floats at :data:`QUANTILES`, or None when the
        column has no value; ``area_fraction`` is mask area / image pixels, in [0, 1]) and ``top_nouns``
        (up to 10 ``[noun, count]``, most frequent first, ties by noun).
    """
    rows = table.num_rows
    image_ids = np.asarray(table["image_id"].to_numpy(zero_copy_only=False)) if rows else np.zeros(0, np.int64)
    nouns = table["noun"].to_pylist() if rows else []
    _, per_image = np.unique(image_ids, return_counts=True)
    noun_values, noun_counts = (
        np.unique(np.asarray(nouns, dtype=object).astype(str), return_counts=True)
        if nouns
        else (np.zeros(0, str), np.zeros(0, np.int64))
    )
    order = sorted(range(len(noun_values)), key=lambda i: (-int(noun_counts[i]), str(noun_values[i])))[:10]

    def column(name: str) -> np.ndarray:
        values = table[name].drop_null().to_numpy(zero_copy_only=False) if rows else np.zeros(0)
        return np.asarray(values, dtype=np.float64)

    columns = {name: column(name) for name in ("similarity", "probability", "margin")}
    if rows:
        pixels = column("width") * column("height")
        columns["area_fraction"] = column("area") / np.maximum(pixels, 1.0)
    else:
        columns["area_fraction"] = np.zeros(0)
    return {
        "pairs": rows,
        "images": int(len(per_image)),
        "unique_nouns": int(len(noun_values)),
        "pairs_per_image": {
            "mean": float(per_image.mean()) if len(per_image) else 0.0,
            "median": float(np.median(per_image)) if len(per_image) else 0.0,
            "max": int(per_image.max()) if len(per_image) else 0,
        },
        "quantiles": {
            name: [float(q) for q in np.quantile(values, QUANTILES)] if len(values) else None
            for name, values in columns.items()
        },
        "top_nouns": [[str(noun_values[i]), int(noun_counts[i])] for i in order],
    }


def size_category(rows: int) -> str:
    """The Hub's ``size_categories`` tag for a number of rows (``n<1K``, ``1K<n<10K``, ...)."""
    bounds = [
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
        (100_000_000, "10M<n<100M"),
        (1_000_000_000, "100M<n<1B"),
    ]
    return next((tag for bound, tag in bounds if rows < bound), "n>1T" if rows >= 10**12 else "1B<n<10B")


def card_header(features_yaml: list, *, rows: int, num_bytes: int, download_bytes: int, pretty_name: str) -> dict:
    """The YAML header of the card as a dict.

    Args:
        features_yaml: the ``datasets`` YAML form of the features (``Features._to_yaml_list()``).
        rows: number of examples in the train split.
        num_bytes: uncompressed Arrow size of the split in bytes.
        download_bytes: total size of the Parquet files in bytes.
        pretty_name: the dataset's display name.
    """
    return {
        "pretty_name": pretty_name,
        "license": "cc-by-4.0",
        "language": ["en"],
        "task_categories": ["image-segmentation", "zero-shot-image-classification"],
        "tags": ["ovseg", "open-vocabulary-segmentation", "coco", "mask-noun-pairs", "ovseg-mine"],
        "size_categories": [size_category(rows)],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_GLOB}]}],
        "dataset_info": {
            "config_name": "default",
            "features": features_yaml,
            "splits": [{"name": "train", "num_bytes": int(num_bytes), "num_examples": int(rows)}],
            "download_size": int(download_bytes),
            "dataset_size": int(num_bytes),
        },
    }


def _fmt(values: list[float] | None) -> str:
    return " | ".join(f"{v:.3f}" for v in values) if values else " | ".join("–" for _ in QUANTILES)


def card_body(
    manifest: dict[str, Any],
    stats: dict[str, Any],
    fields: list[dict[str, Any]],
    *,
    repo_id: str | None,
    embed_crops: int | None,
    partial: bool,
) -> str:
    """The Markdown text of the card (after the YAML header).

    Args:
        manifest: the run's ``manifest.json``.
        stats: :func:`pair_stats` of the published rows.
        fields: the contract's field list (``schemas/pairs-v1.json`` ``fields``), for the schema table.
        repo_id: ``USER/NAME`` for the loading snippet (a placeholder when None).
        embed_crops: crop side in pixels when a ``crop`` column is embedded, else None.
        partial: the run is incomplete (published with ``--allow-partial``).

    Returns:
        Markdown; its first line is the random-weights warning when ``manifest["weights"] == "random"``.
    """
    cfg = manifest.get("config", {})
    counts = manifest.get("counts", {})
    repo = repo_id or "USER/coco-mask-nouns"
    lines: list[str] = []
    if manifest.get("weights") == "random":
        lines += [RANDOM_WARNING, ""]
    lines += ["# Mask–noun pairs mined from COCO Captions (OVSeg recipe)", ""]
    if partial:
        lines += ["**This is a partial run**: not all shards were finished, so some images are missing.", ""]
    lines += [
        "Each row pairs a noun from an image's captions with the class-agnostic mask proposal whose masked crop "
        "CLIP matched best to it, as in *Open-Vocabulary Semantic Segmentation with Mask-adapted CLIP* (OVSeg, "
        "arXiv:2210.04150): segment-anything proposes masks, spaCy extracts the nouns of the captions, each mask "
        "is cut to its tight box with the background filled by CLIP's mean pixel and resized to the CLIP input "
        "size, and each noun is assigned the mask of highest CLIP similarity. Such pairs are the training data "
        "for mask-adapted CLIP. Masks are COCO RLE (column-major); boxes are XYWH pixels of the original image.",
        "",
        "## How the pairs were mined",
        "",
        f"- Package: ovseg-mine {manifest.get('package_version', '?')}, pairs schema version "
        f"{manifest.get('schema_version', '?')}, recipe `{cfg.get('recipe', '?')}` "
        f"(config hash `{manifest.get('config_hash', '?')}`).",
        f"- Weights: **{manifest.get('weights', '?')}**.",
        "",
        "| model | name | weights | source | sha256 |",
        "|---|---|---|---|---|",
    ]
    for role, model in sorted(manifest.get("models", {}).items()):
        lines.append(
            f"| {role} | {model.get('name')} | {model.get('weights')} | {model.get('source') or '–'} "
            f"| {(model.get('sha256') or '–')[:16]} |"
        )
    lines += ["", "Thresholds and settings of the recipe:", ""]
    for section in ("sam", "clip", "matching", "nouns", "source"):
        if isinstance(cfg.get(section), dict):
            values = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(cfg[section].items()))
            lines.append(f"- `{section}`: {values}")
    rejects = ", ".join(f"{k}: {v}" for k, v in sorted(counts.get("rejects_by_stage", {}).items())) or "none"
    ppi = stats["pairs_per_image"]
    lines += [
        "",
        "## Counts and distributions",
        "",
        f"- Pairs: {stats['pairs']} from {stats['images']} images with pairs; {stats['unique_nouns']} unique nouns.",
        f"- Run: {counts.get('images', '?')} images mined, {counts.get('images_rejected', '?')} rejected "
        f"(by stage: {rejects}).",
        f"- Pairs per image: mean {ppi['mean']:.2f}, median {ppi['median']:.1f}, max {ppi['max']}.",
        "",
        "| quantile | " + " | ".join(f"{q:g}" for q in QUANTILES) + " |",
        "|---|" + "---|" * len(QUANTILES),
    ]
    for name, values in stats["quantiles"].items():
        lines.append(f"| {name} | {_fmt(values)} |")
    if stats["top_nouns"]:
        lines += ["", "Most frequent nouns: " + ", ".join(f"{n} ({c})" for n, c in stats["top_nouns"]) + "."]
    lines += ["", "## Columns", "", "| column | type | description |", "|---|---|---|"]
    for field in fields:
        kind = field["type"] if isinstance(field["type"], str) else ("struct" if "struct" in field["type"] else "list")
        lines.append(f"| `{field['name']}` | {kind} | {field.get('description', '')} |")
    if embed_crops:
        lines.append(
            f"| `crop` | image | the masked crop as a lossless PNG, {embed_crops}x{embed_crops} "
            "(tight box, background = CLIP mean pixel, bicubic resize) |"
        )
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'pairs = load_dataset("{repo}", split="train")',
        "row = pairs[0]",
        'print(row["noun"], row["similarity"], row["bbox"])',
        "```",
        "",
    ]
    if embed_crops:
        lines += ['The `crop` column holds the rendered masked crop: `row["crop"]` is a PIL image.', ""]
    lines += [
        "Render the masked crop of a row from the source image (COCO `file_name` under your image folder):",
        "",
        "```python",
        "import numpy as np",
        "from PIL import Image",
        "from pycocotools import mask as mask_utils",
        "",
        'image = np.asarray(Image.open(f"coco/val2017/{row[\'file_name\']}").convert("RGB"))',
        'mask = mask_utils.decode({"size": row["mask"]["size"], "counts": row["mask"]["counts"].encode()})',
        'x, y, w, h = row["bbox"]',
        "fill = np.array([0.48145466, 0.4578275, 0.40821073]) * 255  # CLIP mean pixel",
        "crop = np.where(mask[y:y + h, x:x + w, None] > 0, image[y:y + h, x:x + w], fill).round().astype(np.uint8)",
        "# mining resizes with torch bicubic (no antialiasing); PIL's bicubic is close, not bit-identical",
        "crop = Image.fromarray(crop).resize((224, 224), Image.BICUBIC)",
        "```",
        "",
        "## Licenses",
        "",
        "The captions and the COCO annotations the pairs derive from are licensed CC BY 4.0 by the COCO "
        "Consortium; the images belong to their Flickr authors and are used under their Flickr licenses (listed "
        "per image in the COCO annotation files), and the COCO Consortium does not own their copyright. "
        + ("The embedded crops are derived from those images and carry their licenses. " if embed_crops else "")
        + "The masks and scores in this dataset are released under CC BY 4.0.",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


def render_card(header: dict[str, Any], body: str) -> str:
    """``---`` YAML header ``---`` followed directly by the body (its first line is the card's first line)."""
    import yaml

    return "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n" + body
