"""`evaluate`: hand-made images and annotations classified by a constructed model with known answers, the
batched text side against mining's, and the CLI with --baseline on a real (tiny, random) checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_mine.finetune.evaluate import EvaluateError, classify, load_ground_truth, topk_hits

from helpers.cli import run_cli

COLORS = {
    "red": (1, 0, 0),
    "green": (0, 1, 0),
    "blue": (0, 0, 1),
    "yellow": (1, 1, 0),
    "cyan": (0, 1, 1),
    "magenta": (1, 0, 1),
}


class ColorCLIP(torch.nn.Module):
    """A constructed CLIP: a crop's embedding is its mean RGB minus 0.5; a text's is its colour word's RGB
    minus 0.5. With mean 0 and std 1 normalization, crops arrive as pixels / 255."""

    names = list(COLORS)

    def encode_image(self, x):
        return x.mean(dim=(2, 3)) - 0.5

    def encode_text(self, tokens):
        table = torch.tensor([COLORS[n] for n in self.names], dtype=torch.float32) - 0.5
        return table[tokens[:, 0]]

    def tokenize(self, texts):
        return torch.tensor([[next(i for i, n in enumerate(self.names) if f" {n}" in f" {t}")] for t in texts])


def _box(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


@pytest.fixture()
def colour_gt(tmp_path):
    """Two 64x48 images with coloured rectangles on grey; 4 scored annotations, 1 crowd, 1 tiny."""
    images = tmp_path / "images"
    images.mkdir()
    a = np.full((48, 64, 3), 128, np.uint8)
    a[4:20, 4:30] = (255, 0, 0)
    a[24:44, 10:40] = (0, 255, 0)
    b = np.full((48, 64, 3), 128, np.uint8)
    b[5:25, 5:25] = (0, 0, 255)
    b[30:46, 30:60] = (255, 0, 0)
    Image.fromarray(a).save(images / "a.png")
    Image.fromarray(b).save(images / "b.png")
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(COLORS)]
    cid = {c["name"]: c["id"] for c in cats}
    anns = [
        (1, "red", (4, 4, 26, 16), 0),
        (1, "green", (10, 24, 30, 20), 0),
        (2, "blue", (5, 5, 20, 20), 0),
        (2, "yellow", (30, 30, 30, 16), 0),  # a red object labelled yellow: wrong at top-1, right at top-5
        (2, "red", (30, 30, 30, 16), 1),  # crowd: skipped
        (1, "cyan", (60, 0, 2, 2), 0),  # 4 pixels: tiny, skipped
    ]
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.png", "width": 64, "height": 48},
        ],
        "categories": cats,
        "annotations": [
            {
                "id": k + 1,
                "image_id": im,
                "category_id": cid[name],
                "segmentation": _box(*box),
                "area": box[2] * box[3],
                "bbox": list(box),
                "iscrowd": crowd,
            }
            for k, (im, name, box, crowd) in enumerate(anns)
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, images


def test_constructed_model_gives_known_accuracies(colour_gt):
    path, images = colour_gt
    gt = load_ground_truth(path, images, min_area=16)
    assert gt.annotations == 4 and gt.skipped == {"crowd": 1, "tiny": 1, "missing_image": 0, "undecodable_image": 0}
    model = ColorCLIP()
    res = classify(model, model.tokenize, gt, size=16, mean=(0, 0, 0), std=(1, 1, 1))
    assert res["masks"] == 4 and res["categories"] == 6
    assert res["top1"] == 0.75 and res["top5"] == 1.0
    assert res["per_category"] == {
        "red": {"n": 1, "top1": 1.0, "top5": 1.0},
        "green": {"n": 1, "top1": 1.0, "top5": 1.0},
        "blue": {"n": 1, "top1": 1.0, "top5": 1.0},
        "yellow": {"n": 1, "top1": 0.0, "top5": 1.0},
    }
    assert res["mean_top1"] == 0.75


def test_topk_hits_and_missing_images(colour_gt, tmp_path):
    h1, h5 = topk_hits(torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]]), [1, 1], k=2)
    assert h1.tolist() == [True, False] and h5.tolist() == [True, False]
    path, images = colour_gt
    (images / "b.png").unlink()
    gt = load_ground_truth(path, images)
    assert gt.missing_images == ["b.png"] and gt.skipped["missing_image"] == 3 and gt.annotations == 2
    (images / "a.png").unlink()
    with pytest.raises(EvaluateError, match="no annotation to classify"):
        load_ground_truth(path, images)
    with pytest.raises(EvaluateError, match="not found"):
        load_ground_truth(tmp_path / "nope.json", images)


@pytest.mark.slow
def test_cli_evaluate_with_baseline(smoke_run, sample, tmp_path):
    from ovseg_mine.finetune.config import build_config
    from ovseg_mine.finetune.train import train_worker

    out = tmp_path / "ft"
    train_worker(
        build_config(
            shards=smoke_run,
            out=out,
            mode="full+prompt",
            max_steps=2,
            batch_size=16,
            epochs=1,
            warmup_steps=0,
            loader_workers=0,
            prompt_depth=2,
        )
    )
    result = run_cli(
        "evaluate",
        "--checkpoint",
        str(out),
        "--gt",
        str(sample / "instances.json"),
        "--images",
        str(sample / "images"),
        "--baseline",
        "--limit",
        "4",
        "--json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    res = json.loads(result.stdout)
    data = json.loads((sample / "instances.json").read_text())
    first4 = sorted(im["id"] for im in data["images"])[:4]
    expect = sum(1 for a in data["annotations"] if a["image_id"] in first4 and not a["iscrowd"] and a["area"] >= 16)
    for name in ("checkpoint", "baseline"):
        assert res[name]["masks"] == expect and res[name]["categories"] == len(data["categories"])
        assert 0 <= res[name]["top1"] <= res[name]["top5"] <= 1
        assert sum(v["n"] for v in res[name]["per_category"].values()) == expect
    text = run_cli(
        "evaluate",
        "--checkpoint",
        str(out),
        "--gt",
        str(sample / "instances.json"),
        "--images",
        str(sample / "images"),
        "--limit",
        "1",
    )
    assert text.returncode == 0 and "all masks" in text.stdout and "checkpoint top1" in text.stdout
    bad = run_cli(
        "evaluate",
        "--checkpoint",
        str(tmp_path),
        "--gt",
        str(sample / "instances.json"),
        "--images",
        str(sample / "images"),
    )
    assert bad.returncode == 2 and "not an ovseg-mine finetune output" in bad.stderr and "Traceback" not in bad.stderr
