"""`evaluate` on semantic-segmentation benchmarks: a constructed CLIP with known answers (perfect two-stage mIoU,
uncovered pixels counted wrong, regions all right), OVSeg's semantic inference, ADE20K's sample (or a benchmark
built from the bundled COCO sample) end to end with the tiny models in both tasks, saved predictions re-scored to
the same metrics, COCO instances as an 80-class benchmark with their own masks as proposals, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_mine.evaluate.dataset import open_benchmark
from ovseg_mine.evaluate.labels import LabelError, read_label_map
from ovseg_mine.evaluate.run import Request, evaluate_benchmark
from ovseg_mine.evaluate.semseg import semantic_inference
from ovseg_mine.evaluate.weights import Classifier

from helpers.cli import run_cli

ADE = Path(__file__).resolve().parents[3] / "shared" / "data" / "ade-sample" / "ADEChallengeData2016"
COLORS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0)}


class ColorCLIP(torch.nn.Module):
    """A constructed CLIP: a crop's embedding is its mean RGB (in [0, 1]) minus 0.5; a text's is its colour word's
    RGB minus 0.5."""

    names = list(COLORS)

    def encode_image(self, x):
        return x.mean(dim=(2, 3)) - 0.5

    def encode_text(self, tokens):
        return torch.tensor([COLORS[n] for n in self.names], dtype=torch.float32)[tokens[:, 0]] - 0.5

    def tokenize(self, texts):
        return torch.tensor([[next(i for i, n in enumerate(self.names) if f" {n}" in f" {t}")] for t in texts])


def colour_classifier() -> Classifier:
    model = ColorCLIP()
    return Classifier("model", model, model.tokenize, None, 16, (0, 0, 0), (1, 1, 1), {"weights": "constructed"})


@pytest.fixture()
def colour_bench(tmp_path):
    """Two 40x60 images tiled with coloured rectangles; label maps (0 = other, k = class k, as ADE20K's raw maps);
    SA-1B JSON giving every rectangle as a mask except the yellow one of image b."""
    from pycocotools import mask as mask_utils

    images, labels, sa1b = tmp_path / "images", tmp_path / "labels", tmp_path / "sa1b"
    for d in (images, labels, sa1b):
        d.mkdir()
    names = list(COLORS)
    layouts = {
        "a": [("red", (0, 0, 30, 40)), ("green", (30, 0, 30, 20)), ("blue", (30, 20, 30, 20))],
        "b": [("blue", (0, 0, 60, 25)), ("yellow", (0, 25, 60, 15))],
    }
    for stem, rects in layouts.items():
        pixels, raw, anns = np.zeros((40, 60, 3), np.uint8), np.zeros((40, 60), np.uint8), []
        for name, (x, y, w, h) in rects:
            pixels[y : y + h, x : x + w] = np.array(COLORS[name]) * 255
            raw[y : y + h, x : x + w] = names.index(name) + 1
            if not (stem == "b" and name == "yellow"):
                m = np.zeros((40, 60), np.uint8)
                m[y : y + h, x : x + w] = 1
                rle = mask_utils.encode(np.asfortranarray(m))
                anns.append(
                    {"segmentation": {"size": [40, 60], "counts": rle["counts"].decode()}, "bbox": [x, y, w, h]}
                )
        raw[0, 0] = 0  # one "other" pixel: ignored
        Image.fromarray(pixels).save(images / f"{stem}.png")
        Image.fromarray(raw).save(labels / f"{stem}.png")
        (sa1b / f"{stem}.json").write_text(json.dumps({"image": {"width": 60, "height": 40}, "annotations": anns}))
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    return tmp_path


def _data(root: Path, **kw):
    return open_benchmark(
        labels_dir=root / "labels",
        images_dir=root / "images",
        classes=root / "classes.txt",
        reduce_zero_label=True,
        **kw,
    )


def test_constructed_clip_two_stage_and_regions_known_answers(colour_bench, tmp_path):
    from ovseg_mine.config import build_config
    from ovseg_mine.evaluate import regions, semseg
    from ovseg_mine.evaluate.run import _semseg_metrics

    data = _data(colour_bench)
    proposals = semseg.Proposals(f"sa1b:{colour_bench / 'sa1b'}", build_config("smoke"), None, None, "cpu")
    out = semseg.segment(data, [colour_classifier()], proposals, save_predictions=tmp_path / "pred")
    m = _semseg_metrics(data, out["matrices"])["model"]
    # every covered pixel right; image b's yellow band (60 x 15) has no proposal: a miss, yellow IoU 0
    total = 2 * 40 * 60 - 2
    assert m["no_class_pixels"] == 900 and m["pACC"] == pytest.approx(100 * (total - 900) / total)
    assert m["IoU"] == {"red": 100.0, "green": 100.0, "blue": 100.0, "yellow": 0.0} and m["mIoU"] == 75.0
    saved = read_label_map(tmp_path / "pred" / "b.png")
    assert saved.dtype == np.uint8 and (saved[25:] == 0).all() and (saved[:25] == 3).all()
    res = regions.classify_regions(data, [colour_classifier()])["model"]
    assert res["masks"] == 5 and res["top1"] == 1.0 and res["mean_top1"] == 1.0


def test_semantic_inference_sums_probabilities_over_masks():
    masks = torch.zeros((3, 2, 4), dtype=torch.bool)
    masks[0, :, :2] = True  # left half
    masks[1, :, 1:3] = True  # middle
    masks[2, 0, 3] = True  # one pixel
    probs = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.5, 0.5], [0.1, 0.1, 0.8]])
    pred = semantic_inference(probs, masks, max_elements=7)  # several chunks
    # column 1: 0.6+0 vs 0.4+0.5 vs 0.5 -> class 1; column 2: 0.5/0.5 tie -> class 1; (1, 3) uncovered -> 3
    assert pred.tolist() == [[0, 1, 1, 2], [0, 1, 1, 3]]


def _coco_benchmark(
    root: Path, sample: Path, n: int, *, raw_zero_other: bool, instances: Path | None = None, images: Path | None = None
) -> tuple[Path, Path, Path]:
    """Label maps of the first n bundled COCO images from their instances (80 classes in category-id order; later
    instances drawn over earlier ones; crowd regions left as background); background 0 (= other, with
    raw_zero_other and class k stored as k + 1) or 255."""
    from ovseg_mine import rle

    instances, images = instances or sample / "instances.json", images or sample / "images"
    data = json.loads(instances.read_text())
    cats = sorted(c["id"] for c in data["categories"])
    labels = root / "labels"
    labels.mkdir(parents=True)
    for im in sorted(data["images"], key=lambda i: i["id"])[:n]:
        raw = np.full((im["height"], im["width"]), 0 if raw_zero_other else 255, np.uint8)
        for a in data["annotations"]:
            if a["image_id"] == im["id"] and not a["iscrowd"]:
                mask = rle.decode(rle.from_segmentation(a["segmentation"], im["height"], im["width"]))
                raw[mask] = cats.index(a["category_id"]) + (1 if raw_zero_other else 0)
        Image.fromarray(raw).save(labels / (Path(im["file_name"]).stem + ".png"))
    names = {c["id"]: c["name"] for c in data["categories"]}
    (root / "classes.txt").write_text("\n".join(names[c] for c in cats) + "\n")
    return labels, images, root / "classes.txt"


@pytest.fixture(scope="module")
def ade_like(tmp_path_factory, sample):
    """ADE20K's sample (raw maps, 0 = other) with the bundled ADE-150 names when ../shared/data has it, else 3
    bundled COCO images as the same kind of benchmark."""
    if (ADE / "annotations" / "validation").is_dir():
        return ADE / "annotations" / "validation", ADE / "images" / "validation", "ade150"
    root = tmp_path_factory.mktemp("ade_like")
    return _coco_benchmark(root, sample, 3, raw_zero_other=True)


def test_ade_sample_end_to_end_both_tasks_and_rescored_predictions(ade_like, tmp_path):
    labels, images, classes = ade_like
    kw = dict(labels_dir=labels, images_dir=images, classes=classes, reduce_zero_label=True)
    tiny = dict(arch="ovseg-tiny-vit", pretrained="random", pipeline="smoke")
    sem = evaluate_benchmark(open_benchmark(**kw), Request(task="semseg", save_predictions=str(tmp_path), **tiny))
    m = sem["models"]["model"]["metrics"]
    assert sem["images"] == 3 and sem["skipped"] == [] and sem["proposals"]["kind"] == "sam"
    assert m["pixels"] == sum(int((np.asarray(Image.open(p)) != 0).sum()) for p in sorted(Path(labels).glob("*.png")))
    assert 0 <= m["mIoU"] <= 100 and 0 <= m["pACC"] <= 100 and sem["proposals_per_image"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in Path(labels).glob("*.png"))
    again = evaluate_benchmark(open_benchmark(**kw), Request(predictions=str(tmp_path)))
    assert again["task"] == "predictions" and again["models"]["predictions"]["metrics"] == m
    reg = evaluate_benchmark(open_benchmark(**kw), Request(task="regions", **tiny))["models"]["model"]["metrics"]
    regions = sum(len(set(np.unique(np.asarray(Image.open(p)))) - {0}) for p in Path(labels).glob("*.png"))
    assert reg["masks"] == regions and 0 <= reg["top1"] <= reg["top5"] <= 1


def test_coco_instances_as_80_class_maps_with_their_masks_as_proposals(sample, tmp_path):
    """coco-mini (../shared/data) when present, else the bundled sample: 4 images' instances as label maps."""
    from helpers.sources import COCO_MINI

    instances, images = sample / "instances.json", sample / "images"
    if (COCO_MINI / "annotations" / "instances_val2017.json").is_file():
        instances, images = COCO_MINI / "annotations" / "instances_val2017.json", COCO_MINI / "val2017"
    labels, images, classes = _coco_benchmark(
        tmp_path, sample, 4, raw_zero_other=False, instances=instances, images=images
    )
    data = open_benchmark(labels_dir=labels, images_dir=images, classes=classes)
    assert len(data.classes) == 80
    res = evaluate_benchmark(
        data,
        Request(
            proposals=f"coco:{instances}",
            arch="ovseg-tiny-vit",
            pretrained="random",
            pipeline="smoke",
            overrides=["sam.max_masks_per_image=1000"],  # smoke keeps 16 masks: a crowded image has more instances
        ),
    )
    m = res["models"]["model"]["metrics"]
    assert res["images"] == 4 and res["no_proposals"] == [] and res["proposals"]["kind"] == "coco"
    assert m["pixels"] > 0 and m["no_class_pixels"] == 0  # every labelled pixel lies in its own instance mask


def test_bad_input_is_listed_or_named(colour_bench, tmp_path):
    # a label map of another size than its image: listed skip
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(colour_bench / "labels" / "a.png")
    (colour_bench / "labels" / "c.png").write_bytes((colour_bench / "labels" / "b.png").read_bytes())  # no image c
    data = _data(colour_bench)
    got = [s.stem for s in data.samples(with_images=True)]
    assert got == ["b"]
    reasons = {s["file"]: s["reason"] for s in data.skipped}
    assert "10x10 but its image a.png is 60x40" in reasons["a.png"] and "no image c.jpg" in reasons["c.png"]
    # a prediction missing: listed; a prediction value outside the classes: file and value named
    preds = tmp_path / "preds"
    preds.mkdir()
    Image.fromarray(np.ones((40, 60), np.uint8)).save(preds / "b.png")
    out = evaluate_benchmark(_data(colour_bench), Request(predictions=str(preds)))
    assert out["images"] == 1 and {s["file"] for s in out["skipped"]} == {"a.png", "c.png"}
    Image.fromarray(np.full((40, 60), 9, np.uint8)).save(preds / "b.png")
    with pytest.raises(LabelError, match=r"b\.png: label value 9 is outside the 4 classes"):
        evaluate_benchmark(_data(colour_bench), Request(predictions=str(preds)))
    # a label value outside the classes
    Image.fromarray(np.full((40, 60), 7, np.uint8)).save(colour_bench / "labels" / "b.png")
    with pytest.raises(LabelError, match=r"labels/b\.png: label value 7 is outside"):
        list(_data(colour_bench).samples())


def test_cli_bad_class_list_is_one_line(colour_bench):
    (colour_bench / "dup.txt").write_text("red\nblue\nred\n")
    args = ["evaluate", "--sem-seg", str(colour_bench / "labels"), "--images", str(colour_bench / "images")]
    res = run_cli(*args, "--classes", str(colour_bench / "dup.txt"), "--arch", "ovseg-tiny-vit")
    assert res.returncode == 2 and "'red' is given twice (lines 1 and 3)" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.slow
def test_cli_semseg_out_json_and_rescoring(ade_like, tmp_path):
    labels, images, classes = ade_like
    base = ["evaluate", "--sem-seg", str(labels), "--images", str(images), "--classes", str(classes)]
    base += ["--reduce-zero-label"]
    res = run_cli(
        *base,
        *["--arch", "ovseg-tiny-vit", "--pretrained", "random", "--pipeline", "smoke", "--cpu"],
        *["--out", str(tmp_path / "out"), "--save-predictions", str(tmp_path / "pred"), "--json"],
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == result
    header = (tmp_path / "out" / "per_class.csv").read_text().splitlines()[0]
    assert header == "class,model IoU,model ACC" and (tmp_path / "out" / "per_class.png").stat().st_size > 1000
    again = run_cli(*base, "--predictions", str(tmp_path / "pred"), "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["models"]["predictions"]["metrics"] == result["models"]["model"]["metrics"]
    text = run_cli(*base, "--predictions", str(tmp_path / "pred"))
    assert "mIoU" in text.stdout and "3 images scored" in text.stdout


def test_benchmark_layout_gives_the_raw_maps_metrics(ade_like, tmp_path, monkeypatch):
    """detectron2's ade150 layout, built from the raw maps as prepare_ade20k_sem_seg.py does (label - 1, 0 -> 255),
    found under $DETECTRON2_DATASETS, scores prediction files exactly as the raw maps with --reduce-zero-label."""
    labels, images, _ = ade_like  # the COCO stand-in's raw values (1..80) are ADE-150 values too
    root = tmp_path / "datasets" / "ADEChallengeData2016"
    (root / "annotations_detectron2" / "validation").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "images" / "validation").symlink_to(Path(images))
    preds = tmp_path / "preds"
    preds.mkdir()
    rng = np.random.default_rng(0)
    for p in sorted(Path(labels).glob("*.png")):
        raw = np.asarray(Image.open(p))
        d2 = np.where(raw == 0, 255, raw.astype(np.int64) - 1).astype(np.uint8)
        Image.fromarray(d2).save(root / "annotations_detectron2" / "validation" / p.name)
        pred = np.where(rng.random(raw.shape) < 0.6, raw, rng.integers(0, 151, size=raw.shape)).astype(np.uint8)
        Image.fromarray(pred).save(preds / p.name)  # raw label space: 0 = no class
    raw_way = evaluate_benchmark(
        open_benchmark(labels_dir=labels, images_dir=images, classes="ade150", reduce_zero_label=True),
        Request(predictions=str(preds)),
    )["models"]["predictions"]["metrics"]
    d2_preds = tmp_path / "d2_preds"
    d2_preds.mkdir()
    for p in preds.iterdir():  # the same predictions in detectron2's label space: class - 1, no class 255
        v = np.asarray(Image.open(p)).astype(np.int64)
        Image.fromarray(np.where(v == 0, 255, v - 1).astype(np.uint8)).save(d2_preds / p.name)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    data = open_benchmark(benchmark="ade150")
    assert data.ignore_label == 255 and len(data.classes) == 150 and len(data) == 3
    d2_way = evaluate_benchmark(data, Request(predictions=str(d2_preds)))["models"]["predictions"]["metrics"]
    assert d2_way == raw_way and 0 < raw_way["mIoU"] < 100 and raw_way["no_class_pixels"] > 0


def test_seen_classes_and_unknown_names(colour_bench):
    (colour_bench / "seen.txt").write_text("red\ngreen\n")
    data = _data(colour_bench, seen_classes=colour_bench / "seen.txt")
    assert data.seen == [0, 1]
    preds = colour_bench / "preds"
    preds.mkdir()
    for p in (colour_bench / "labels").iterdir():
        Image.fromarray(np.asarray(Image.open(p))).save(preds / p.name)  # perfect
    m = evaluate_benchmark(data, Request(predictions=str(preds)))["models"]["predictions"]["metrics"]
    assert m["mIoU-seen"] == m["mIoU-unseen"] == m["hIoU"] == m["mIoU"] == 100.0
    (colour_bench / "seen.txt").write_text("red\npurple\n")
    with pytest.raises(LabelError, match="purple"):
        _data(colour_bench, seen_classes=colour_bench / "seen.txt")
    with pytest.raises(LabelError, match="valid: ade150, ade847, pc459, pc59, voc20"):
        open_benchmark(benchmark="ade20k")
    with pytest.raises(LabelError, match="ships no class names: give --classes FILE"):
        open_benchmark(benchmark="pc59", root=colour_bench)


@pytest.fixture()
def tiny_checkpoint(tmp_path):
    """A finetune folder as `finetune` writes it (weights, mask prompts, metadata), from the tiny random CLIP with
    its image tower's projection scaled and random prompts: it differs from its start weights."""
    from ovseg_mine.finetune.checkpoint import save_weights, write_metadata
    from ovseg_mine.finetune.mask_prompt import PROMPTS_FILE, MaskPrompts, save_prompts
    from ovseg_mine.models import clip_input_size, clip_mean_std, load_clip

    out = tmp_path / "ckpt"
    model, _, info = load_clip("ovseg-tiny-vit", "random", seed=0)
    with torch.no_grad():
        model.visual.proj.mul_(-1.0)
        prompts = MaskPrompts(model.visual, depth=2)
        prompts.prompts.normal_(0, 1.0)
    save_weights(model, out)
    save_prompts(prompts, out / PROMPTS_FILE, arch="ovseg-tiny-vit")
    mean, std = clip_mean_std(model)
    start = {"arch": "ovseg-tiny-vit", "pretrained": "random", "seed": 0, "prompts": None, "weights": info.to_dict()}
    meta = {"open_clip_arch": "ovseg-tiny-vit", "start": start, "complete": True}
    write_metadata(out, {**meta, "preprocess": {"mean": mean, "std": std, "size": clip_input_size(model)}})
    return out


def test_checkpoint_with_prompts_against_its_baseline(colour_bench, tiny_checkpoint, tmp_path):
    pred = tmp_path / "pred"
    weights = dict(checkpoint=str(tiny_checkpoint), baseline=True)
    res = evaluate_benchmark(
        _data(colour_bench),
        Request(proposals=f"sa1b:{colour_bench / 'sa1b'}", pipeline="smoke", save_predictions=str(pred), **weights),
    )
    models = res["models"]
    assert list(models) == ["checkpoint", "baseline"]
    assert models["checkpoint"]["mask_prompts"] and not models["baseline"]["mask_prompts"]
    assert models["baseline"]["weights"]["weights"] == "random"
    for name in models:  # same proposals for both, so the same uncovered pixels; each model's predictions re-score
        assert models[name]["metrics"]["no_class_pixels"] == 900
        assert sorted(p.name for p in (pred / name).iterdir()) == ["a.png", "b.png"]
        again = evaluate_benchmark(_data(colour_bench), Request(predictions=str(pred / name)))
        assert again["models"]["predictions"]["metrics"] == models[name]["metrics"]
    reg = evaluate_benchmark(_data(colour_bench), Request(task="regions", **weights))["models"]
    assert reg["checkpoint"]["metrics"]["masks"] == reg["baseline"]["metrics"]["masks"] == 5
    no_prompts = evaluate_benchmark(_data(colour_bench), Request(task="regions", no_prompts=True, **weights))
    assert not no_prompts["models"]["checkpoint"]["mask_prompts"]
