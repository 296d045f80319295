"""Real COCO data (the bundled sample, ../shared/data/coco-mini) and the same images as every kind of source, each
built with its format's own writer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from helpers.cli import REPO

COCO_MINI = Path(os.environ.get("OVSEG_MINE_COCO_MINI", REPO.parent / "shared" / "data" / "coco-mini"))


def coco_items(captions_json: Path, images: Path, n: int = 8) -> list[dict]:
    """The first ``n`` images (by id) of a COCO Captions file: ``image_id``, ``file_name``, ``path``, ``width``,
    ``height``, ``captions`` (stripped, in annotation-id order, as the COCO source orders them)."""
    data = json.loads(captions_json.read_text(encoding="utf-8"))
    by_image: dict[int, list[tuple[int, str]]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append((ann["id"], ann["caption"].strip()))
    entries = sorted(data["images"], key=lambda im: im["id"])[:n]
    return [
        {
            "image_id": im["id"],
            "file_name": im["file_name"],
            "path": str(images / im["file_name"]),
            "width": im["width"],
            "height": im["height"],
            "captions": [c for _, c in sorted(by_image[im["id"]])],
        }
        for im in entries
    ]


def write_coco_captions(dest: Path, items: list[dict]) -> Path:
    """A COCO Captions JSON of ``items`` (their own images folder is the one ``path`` points into)."""
    data = {
        "images": [{k: it[k] for k in ("file_name", "width", "height")} | {"id": it["image_id"]} for it in items],
        "annotations": [
            {"id": 1000 * it["image_id"] + k, "image_id": it["image_id"], "caption": c}
            for it in items
            for k, c in enumerate(it["captions"])
        ],
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(data), encoding="utf-8")
    return dest


def build_hf(dest: Path, items: list[dict], *, parquet_files: int = 0, arrow_shards: int = 1) -> Path:
    """A Hugging Face dataset of ``items`` written by ``datasets`` itself: ``image`` (Image feature, bytes
    embedded), ``captions`` (list of strings), ``image_id`` (int64). ``parquet_files`` > 0: ``Dataset.to_parquet``
    into ``dest/data/train-0000i-of-0000n.parquet`` (the Hub's layout); else ``save_to_disk`` with ``arrow_shards``
    Arrow files."""
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "captions": datasets.List(datasets.Value("string")),
            "image_id": datasets.Value("int64"),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": Path(it["path"]).read_bytes(), "path": it["file_name"]} for it in items],
            "captions": [it["captions"] for it in items],
            "image_id": [it["image_id"] for it in items],
        },
        features=features,
    )
    if parquet_files:
        (dest / "data").mkdir(parents=True, exist_ok=True)
        for i in range(parquet_files):
            part = ds.shard(parquet_files, i, contiguous=True)
            part.to_parquet(str(dest / "data" / f"train-{i:05d}-of-{parquet_files:05d}.parquet"))
    else:
        ds.save_to_disk(str(dest), num_shards=arrow_shards)
    return dest


def build_webdataset(dest: Path, items: list[dict], *, per_tar: int = 1000, extra: dict | None = None) -> Path:
    """Tar shards ``dest/00000.tar``... of ``items`` laid out as img2dataset writes them: ``KEY.jpg``, ``KEY.txt``
    (the first caption), ``KEY.json`` (``key``, ``caption``, ``captions``, ``image_id``, ``status``), KEY being the
    image's file stem. ``extra``: ``{tar index: [(member name, bytes), ...]}`` appended to that tar."""
    import io
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(items), per_tar):
        index = start // per_tar
        with tarfile.open(dest / f"{index:05d}.tar", "w") as tar:

            def add(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))

            for it in items[start : start + per_tar]:
                key = Path(it["file_name"]).stem
                meta = {"key": key, "caption": it["captions"][0], "captions": it["captions"], "status": "success"}
                add(f"{key}.jpg", Path(it["path"]).read_bytes())
                add(f"{key}.txt", it["captions"][0].encode("utf-8"))
                add(f"{key}.json", json.dumps(meta | {"image_id": it["image_id"]}).encode("utf-8"))
            for name, data in (extra or {}).get(index, []):
                add(name, data)
    return dest


def build_folder(dest: Path, items: list[dict], *, lines: list[str] | None = None) -> Path:
    """``dest/`` with the images of ``items`` and a ``captions.jsonl`` (``file_name``, ``captions``, ``image_id``);
    ``lines``: raw lines appended to it."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for it in items:
        shutil.copy(it["path"], dest / it["file_name"])
        rows.append(json.dumps({"file_name": it["file_name"], "captions": it["captions"], "image_id": it["image_id"]}))
    (dest / "captions.jsonl").write_text("\n".join(rows + (lines or [])) + "\n", encoding="utf-8")
    return dest


def build_img2dataset(dest: Path, items: list[dict], *, layout: str, per_shard: int = 1000) -> Path:
    """An img2dataset output folder of ``items`` in its ``parquet``, ``files`` or ``webdataset`` format, laid out as
    img2dataset's writers lay it out: per shard ``NNNNN.parquet`` (one row per URL, downloaded or not: ``key``,
    ``caption``, ``status``, ``error_message``, ``image_id``; plus ``jpg`` bytes and ``txt`` in the parquet format),
    for ``files`` ``NNNNN/KEY.jpg``, ``KEY.txt``, ``KEY.json``, for ``webdataset`` ``NNNNN.tar`` holding the same
    members for the downloaded samples only, and ``NNNNN_stats.json`` (``count``, ``successes``,
    ``failed_to_download``, ``failed_to_resize``). Keys are ``SSSSSIIII`` as img2dataset numbers them; one failed
    download is added per shard."""
    import io
    import shutil
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(items), per_shard):
        shard = start // per_shard
        rows = []
        members: list[tuple[str, bytes]] = []
        for k, it in enumerate(items[start : start + per_shard]):
            key = f"{shard:05d}{k:04d}"
            row = {"key": key, "caption": it["captions"][0], "status": "success", "error_message": None}
            row["image_id"] = it["image_id"]
            if layout == "parquet":
                row |= {"jpg": Path(it["path"]).read_bytes(), "txt": it["captions"][0]}
            elif layout == "files":
                folder = dest / f"{shard:05d}"
                folder.mkdir(exist_ok=True)
                shutil.copy(it["path"], folder / f"{key}.jpg")
                (folder / f"{key}.txt").write_text(it["captions"][0], encoding="utf-8")
                (folder / f"{key}.json").write_text(json.dumps(row), encoding="utf-8")
            else:
                members += [(f"{key}.jpg", Path(it["path"]).read_bytes()), (f"{key}.txt", it["captions"][0].encode())]
                members.append((f"{key}.json", json.dumps(row).encode()))
            rows.append(row)
        failed = {"key": f"{shard:05d}9999", "caption": "A dog.", "status": "failed_to_download"}
        failed |= {"error_message": "HTTP 404", "image_id": 10**9 + shard}
        if layout == "parquet":
            failed |= {"jpg": None, "txt": None}
        rows.append(failed)
        pq.write_table(pa.Table.from_pylist(rows), dest / f"{shard:05d}.parquet")
        if layout == "webdataset":
            with tarfile.open(dest / f"{shard:05d}.tar", "w") as tar:
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        stats = {"count": len(rows), "successes": len(rows) - 1, "failed_to_download": 1, "failed_to_resize": 0}
        (dest / f"{shard:05d}_stats.json").write_text(json.dumps(stats | {"duration": 1.0}), encoding="utf-8")
    return dest


def build_sa1b(dest: Path, instances_json: Path, items: list[dict]) -> Path:
    """SA-1B-style per-image JSON (``dest/STEM.json``: ``image``, ``annotations`` with compressed-RLE
    ``segmentation``, ``bbox``, ``predicted_iou``, ``stability_score``) made with pycocotools from the COCO
    instance masks of ``items``; scores decrease with the annotation's order (1.0, 0.99, ...). Images without
    instances get no file."""
    from pycocotools import mask as mask_utils

    data = json.loads(instances_json.read_text(encoding="utf-8"))
    dest.mkdir(parents=True, exist_ok=True)
    for it in items:
        anns = [a for a in data["annotations"] if a["image_id"] == it["image_id"] and not a["iscrowd"]]
        if not anns:
            continue
        h, w = it["height"], it["width"]
        out = []
        for k, a in enumerate(anns):
            rle_ = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))
            out.append(
                {
                    "id": a["id"],
                    "segmentation": {"size": [h, w], "counts": rle_["counts"].decode("ascii")},
                    "bbox": a["bbox"],
                    "area": int(mask_utils.area(rle_)),
                    "predicted_iou": 1.0 - 0.01 * k,
                    "stability_score": 1.0 - 0.01 * k,
                    "point_coords": [[0.0, 0.0]],
                    "crop_box": [0, 0, w, h],
                }
            )
        image = {"image_id": it["image_id"], "width": w, "height": h, "file_name": it["file_name"]}
        (dest / f"{Path(it['file_name']).stem}.json").write_text(json.dumps({"image": image, "annotations": out}))
    return dest


def instance_masks(instances_json: Path, image_id: int) -> list[np.ndarray]:
    """The non-crowd COCO instance masks of one image (bool [H, W]), in annotation order."""
    from pycocotools import mask as mask_utils

    data = json.loads(instances_json.read_text(encoding="utf-8"))
    image = next(im for im in data["images"] if im["id"] == image_id)
    masks = []
    for a in data["annotations"]:
        if a["image_id"] == image_id and not a["iscrowd"]:
            rle_ = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], image["height"], image["width"]))
            masks.append(mask_utils.decode(rle_).astype(bool))
    return masks


def source_of(kind: str, location, *overrides: str):
    """The ``kind`` source at ``location`` with the smoke recipe and ``overrides`` (``--set`` strings)."""
    from ovseg_mine.config import build_config
    from ovseg_mine.mine.sources import MineInput, build_source

    what = MineInput(kind, str(location))
    return build_source(what.configure(build_config("smoke", list(overrides))), what)


def read_rows(source, images_per_shard: int = 1000) -> list[dict]:
    """Every record row of ``source``: its plan, then each task's read step, called here (no Ray)."""
    plan = source.plan(images_per_shard)
    return [r for task in plan.tasks for table in source.read_shard(task) for r in table.to_pylist()]


def write_repeated_captions(sample: Path, path: Path, copies: int) -> tuple[Path, dict[int, int]]:
    """A COCO Captions JSON listing each image of ``sample`` (the bundled sample's layout) ``copies`` times under new
    ids (``copy * 10**7 + id``), for runs longer than 16 images; returns its path and new id -> sample id."""
    data = json.loads((sample / "captions.json").read_text())
    images, annotations, original = [], [], {}
    for copy in range(1, copies + 1):
        for image in sorted(data["images"], key=lambda i: i["id"]):
            new_id = copy * 10**7 + image["id"]
            original[new_id] = image["id"]
            images.append({**image, "id": new_id})
            for ann in sorted((a for a in data["annotations"] if a["image_id"] == image["id"]), key=lambda a: a["id"]):
                annotations.append({**ann, "id": len(annotations) + 1, "image_id": new_id})
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path, original
