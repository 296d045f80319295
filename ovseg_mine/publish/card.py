"""The dataset card (README.md) of a published run: YAML header for the Hub and datasets, text from the manifest.

The header declares ``configs`` (one ``default`` config whose ``train`` split is ``data/train-*``) and
``dataset_info`` (features, number of examples, bytes) so that the Hub's viewer and ``datasets.load_dataset``
agree on the schema. The text is the template ``ovseg_mine/publish/card.md`` (jinja2) filled from the manifest:
what the pairs are, how they were mined, their counts and distributions, how to load them and render a masked
crop, the licenses of the source data, and the OVSeg citation. Everything here is deterministic (no dates):
rebuilding the same run gives the same card.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ovseg_mine.stats import QUANTILES, summarize

if TYPE_CHECKING:
    import jinja2
    import pyarrow as pa

DATA_GLOB = "data/train-*"
TEMPLATE = Path(__file__).with_name("card.md")
SETTINGS = ("sam", "clip", "matching", "nouns", "source")  # recipe sections listed in the card


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
        values = table[name].to_numpy(zero_copy_only=False) if rows else np.zeros(0)
        return np.asarray(values, dtype=np.float64)  # nulls become NaN: summarize leaves them out

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
        "quantiles": {name: summarize(values).quantiles for name, values in columns.items()},
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


def features_yaml(features: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``dataset_info.features`` list of a dataset card, from ``datasets.Features.to_dict()``.

    The card's YAML form (huggingface.co/docs/hub/datasets-cards, ``dataset_info``): one ``{"name": ...}`` entry
    per column with ``dtype: <type>`` for a value (``string``, ``int32``...) or for a typed feature such as
    ``image``; ``struct: [entries]`` for a dict of columns; ``list: <type or entry>`` (``sequence`` and
    ``large_list`` for those feature types), with ``length`` when fixed.

    Args:
        features: ``Features.to_dict()`` of the published columns: ``{name: feature dict with "_type"}``.

    Raises:
        ValueError: a feature type this card does not describe (class labels, arrays).
    """
    return [{"name": name, **_feature_yaml(feature)} for name, feature in features.items()]


_LIST_TYPES = {"List": "list", "Sequence": "sequence", "LargeList": "large_list"}
_PLAIN_TYPES = {"Image": "image", "Audio": "audio", "Video": "video", "Pdf": "pdf"}


def _feature_yaml(feature: dict[str, Any]) -> dict[str, Any]:
    kind = feature.get("_type")
    if kind is None:  # a dict of columns
        return {"struct": features_yaml(feature)}
    if kind == "Value":
        return {"dtype": feature["dtype"]}
    if kind in _PLAIN_TYPES and set(feature) <= {"_type", "decode"}:
        return {"dtype": _PLAIN_TYPES[kind]}
    if kind in _LIST_TYPES:
        inner: Any = _feature_yaml(feature["feature"])
        if list(inner) in (["dtype"], ["struct"]):  # `list: int32`, `list: [entries]`
            inner = next(iter(inner.values()))
        entry = {_LIST_TYPES[kind]: inner}
        if feature.get("length", -1) != -1:
            entry["length"] = feature["length"]
        return entry
    raise ValueError(f"the dataset card cannot describe a {kind} feature")


def card_header(
    features: list[dict[str, Any]], *, rows: int, num_bytes: int, download_bytes: int, pretty_name: str
) -> dict[str, Any]:
    """The YAML header of the card as a dict.

    Args:
        features: the card's YAML form of the features (:func:`features_yaml`).
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
            "features": features,
            "splits": [{"name": "train", "num_bytes": int(num_bytes), "num_examples": int(rows)}],
            "download_size": int(download_bytes),
            "dataset_size": int(num_bytes),
        },
    }


@lru_cache(maxsize=1)
def _template() -> "jinja2.Template":
    import jinja2

    env = jinja2.Environment(
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML
    )
    env.filters["json"] = json.dumps
    return env.from_string(TEMPLATE.read_text(encoding="utf-8"))


def card_body(
    manifest: dict[str, Any],
    stats: dict[str, Any],
    fields: list[dict[str, Any]],
    *,
    repo_id: str | None,
    embed_crops: int | None,
    partial: bool,
) -> str:
    """The Markdown text of the card (after the YAML header): the template ``card.md`` filled in.

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
    config = manifest.get("config", {})
    return _template().render(
        manifest=manifest,
        config=config,
        counts=manifest.get("counts", {}),
        stats=stats,
        models=sorted(manifest.get("models", {}).items()),
        settings=[(name, sorted(config[name].items())) for name in SETTINGS if isinstance(config.get(name), dict)],
        fields=fields,
        repo=repo_id or "USER/coco-mask-nouns",
        embed_crops=embed_crops,
        partial=partial,
        quantiles=QUANTILES,
        random=manifest.get("weights") == "random",
    )


def render_card(header: dict[str, Any], body: str) -> str:
    """``---`` YAML header ``---`` followed directly by the body (its first line is the card's first line)."""
    import yaml

    return "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n" + body
