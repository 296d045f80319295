"""Helpers shared by the tests: the real CLI in a subprocess, where the real COCO data is, and a hand-made run
folder with known answers (pairs, ground truth) for inspect, report and publish tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ovseg_mine import rle
from ovseg_mine.done_record import DoneRecord, ImageStatus
from ovseg_mine.shards import marker_location, pair_schema, sha256_file, write_shard

REPO = Path(__file__).resolve().parent.parent
COCO_MINI = Path(os.environ.get("OVSEG_MINE_COCO_MINI", REPO.parent / "shared" / "data" / "coco-mini"))


def run_cli(*args: str, timeout: int = 900, failpoints: str | None = None) -> subprocess.CompletedProcess:
    """Run ``ovseg-mine ARGS`` in a subprocess (real CLI, real local Ray); returns the completed process.

    ``failpoints``: the ``OVSEG_MINE_FAILPOINTS`` of the run (ovseg_mine.faults); None: none, whatever the
    test process has."""
    env = {k: v for k, v in os.environ.items() if k != "OVSEG_MINE_FAILPOINTS"}
    if failpoints:
        env["OVSEG_MINE_FAILPOINTS"] = failpoints
    return subprocess.run(
        [sys.executable, "-m", "ovseg_mine.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def kill_processes(processes: list) -> None:
    """SIGKILL these ``psutil.Process``es (those already gone are skipped) and wait until they are gone."""
    import psutil

    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=30)


def upload(folder: Path, uri: str) -> str:
    """Copy every file under the local ``folder`` to the same relative keys under ``uri``; returns ``uri``."""
    from ovseg_mine.storage import resolve

    target = resolve(uri)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        target.join(path.relative_to(folder).as_posix()).write_bytes(path.read_bytes())
    return uri


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """moto's S3-compatible server in its own process, bound to 127.0.0.1 (no traffic leaves the machine).

    ``env`` holds what a client needs (endpoint, region and dummy credentials, the standard AWS variables);
    :meth:`bucket` creates a bucket and returns its ``s3://`` URI.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "test-key-id",
            "AWS_SECRET_ACCESS_KEY": "test-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start on 127.0.0.1:{self.port}") from None
                time.sleep(0.1)

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (lowercase, 3-63 characters) and return ``s3://name``."""
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            access_key=self.env["AWS_ACCESS_KEY_ID"],
            secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
            endpoint_override=self.endpoint,
            region=self.env["AWS_DEFAULT_REGION"],
            allow_bucket_creation=True,
        )
        fs.create_dir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


#: How every line the CLI prints itself begins (its progress bar, summaries, notes, one-line errors, and the
#: ``LEVEL: message`` lines of its logging set-up).
CLI_LINE_PREFIXES = (
    "mining ",
    "complete:",
    "partial:",
    "note:",
    "shards and manifest:",
    "stopped by SIGINT:",
    "stopped by SIGTERM:",
    "error:",
    "warning:",
    "WARNING:",
    "ERROR:",
    "report:",
    "dry run:",
    "published:",
)


def assert_only_cli_lines(output: str) -> None:
    """Every non-empty line of ``output`` is one of the CLI's own (no line from Ray or another library)."""
    foreign = [line for line in output.splitlines() if line.strip() and not line.startswith(CLI_LINE_PREFIXES)]
    assert not foreign, "lines not from the CLI:\n" + "\n".join(foreign[:20])


SCORE_COLUMNS = ("similarity", "probability", "margin", "predicted_iou", "stability_score")


def assert_same_pairs(first: list[dict], second: list[dict], *, atol: float = 1e-5) -> None:
    """The determinism contract across workers, threads and batching: the same pairs in the same order, every
    column equal (noun, mask RLE, bbox, ids, caption...) except the float scores, which agree within ``atol``."""
    assert len(first) == len(second), (len(first), len(second))
    for a, b in zip(first, second, strict=True):
        assert {k: v for k, v in a.items() if k not in SCORE_COLUMNS} == {
            k: v for k, v in b.items() if k not in SCORE_COLUMNS
        }, (a["pair_id"], b["pair_id"])
        for column in SCORE_COLUMNS:
            if a[column] is None or b[column] is None:
                assert a[column] is b[column], (a["pair_id"], column)
            else:
                assert abs(a[column] - b[column]) <= atol, (a["pair_id"], column, a[column], b[column])


# --- a hand-made run folder with known answers -------------------------------------------------------------

H, W = 10, 20
CATEGORIES = [
    {"id": 1, "name": "person"},
    {"id": 17, "name": "cat"},
    {"id": 18, "name": "dog"},
    {"id": 24, "name": "zebra"},
]


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """bool [H, W] mask, True on rows y0:y1, columns x0:x1."""
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# A polygon ground truth; the mined "puppy" mask is its exact rasterization (pycocotools), so IoU is 1.
DOG_POLYGON = [[0.0, 0.0, 10.0, 0.0, 10.0, 5.0, 0.0, 5.0]]


def polygon_mask() -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(DOG_POLYGON, H, W))).astype(bool)


def _pair(image_id: int, noun: str, mask: np.ndarray, caption: str, sim: float, **extra) -> dict:
    enc = rle.encode(mask)
    return {
        "pair_id": f"{image_id}:{noun}",
        "image_id": image_id,
        "file_name": f"{image_id}.png",
        "width": W,
        "height": H,
        "caption_index": 0,
        "caption": caption,
        "noun": noun,
        "mask": enc,
        "bbox": [int(v) for v in rle.bbox(enc)],
        "area": int(mask.sum()),
        "proposal_index": 0,
        "num_proposals": 4,
        "similarity": sim,
        "probability": sim,
        "margin": extra.get("margin", 0.1),
        "predicted_iou": 0.9,
        "stability_score": 0.95,
    }


def handmade_pairs(caption: str = "a puppy and a man") -> list[dict]:
    """7 pairs in images 1 and 2 (image 3 has none); with :func:`write_gt`: IoUs puppy 1, man 0, dog 1, cat and
    kitten 0.5; zebra's category is not in image 1; sky maps to no category; cat and kitten share one mask."""
    return [
        _pair(1, "puppy", polygon_mask(), caption, 0.30),
        _pair(1, "man", box(5, 10, 10, 20), caption, 0.10),
        _pair(1, "zebra", box(0, 5, 10, 20), caption, 0.20),
        _pair(1, "sky", box(5, 10, 0, 10), caption, 0.05, margin=None),
        _pair(2, "dog", box(0, 10, 0, 10), "a dog, a cat", 0.40),
        _pair(2, "cat", box(0, 10, 10, 20), "a dog, a cat", 0.25),
        _pair(2, "kitten", box(0, 10, 10, 20), "a dog, a kitten", 0.15),
    ]


def remark_shard(run: Path, index: int) -> None:
    """Rewrite shard ``index``'s done marker for the file's current bytes, as a writer that followed the commit
    protocol would have (for tests of what readers do with a consistently committed, but odd, shard)."""
    marker = Path(marker_location(run, index))
    record = json.loads(marker.read_text())
    record["sha256"] = sha256_file(run / record["file"])
    marker.write_text(json.dumps(record))


def make_run(root: Path, pairs: list[dict] | None = None, image_root: Path | None = None) -> Path:
    """A run folder with one shard of ``pairs`` (default :func:`handmade_pairs`) for images 1, 2, 3."""
    pairs = handmade_pairs() if pairs is None else pairs
    run = root / "run"
    images = [
        ImageStatus(i, "ok", "", W, H, num_nouns=4, num_proposals=4, num_pairs=sum(p["image_id"] == i for p in pairs))
        for i in (1, 2)
    ]
    reason = "all 2 nouns below the matching thresholds"
    images.append(ImageStatus(3, "matching", reason, W, H, num_nouns=2, num_proposals=3, num_pairs=0))
    table = pa.Table.from_pylist(pairs, schema=pair_schema())
    write_shard(
        run,
        0,
        table,
        file_metadata={"config": {}},
        row_group_size=100,
        done_record=DoneRecord(shard=0, image_ids=(1, 2, 3), images=tuple(images)),
    )
    manifest = {
        "schema_version": 1,
        "status": "complete",
        "weights": "pretrained",
        "source": {"captions": "captions.json", "image_root": str(image_root or root / "images")},
        "rejects": [{"image_id": 3, "file_name": "3.png", "stage": "matching", "reason": "below thresholds"}],
    }
    (run / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return run


def write_gt(path: Path, image_ids: tuple[int, ...] = (1, 2, 3)) -> Path:
    """COCO instances: image 1 dog (polygon) + person; image 2 dog as two RLE halves + cat (top half of the
    mined cat mask)."""

    def ann(aid: int, image_id: int, cat: int, seg) -> dict:
        return {
            "id": aid,
            "image_id": image_id,
            "category_id": cat,
            "segmentation": seg,
            "iscrowd": 0,
            "area": 1,
            "bbox": [0, 0, 1, 1],
        }

    anns = [
        ann(1, 1, 18, DOG_POLYGON),
        ann(2, 1, 1, rle.encode(box(0, 5, 10, 20))),
        ann(3, 2, 18, rle.encode(box(0, 5, 0, 10))),
        ann(4, 2, 18, rle.encode(box(5, 10, 0, 10))),
        ann(5, 2, 17, rle.encode(box(0, 5, 10, 20))),
    ]
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": W, "height": H} for i in image_ids],
        "annotations": [a for a in anns if a["image_id"] in image_ids],
        "categories": CATEGORIES,
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# --- the same COCO images as every kind of source ----------------------------------------------------------


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
