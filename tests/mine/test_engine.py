"""The GPU stage's engine (ovseg_mine.mine.algorithms.engine) with the tiny SAM and CLIP on real COCO images: what a
batch gives does not depend on the batch, matches agree with the single-image proposals and the per-mask crop path,
failures stay per image."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_mine import rle
from ovseg_mine.config import build_config
from ovseg_mine.mine.algorithms.engine import ImageJob, MiningEngine
from ovseg_mine.models import load_clip, load_sam

NOUNS = [["dog", "bed"], ["man", "snowboard", "slope"], ["player"]]


def _engine(*overrides: str) -> MiningEngine:
    cfg = build_config("smoke", ["sam.points_per_side=3", *overrides])
    sam, _ = load_sam("tiny", "random", seed=0)
    clip, tokenizer, _ = load_clip("ovseg-tiny-vit", "random", seed=0)
    return MiningEngine(cfg, sam, clip, tokenizer, torch.device("cpu"))


@pytest.fixture(scope="module")
def images(sample) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted((sample / "images").glob("*.jpg"))[:3]]


def _jobs(engine: MiningEngine, images: list[np.ndarray]) -> list[ImageJob]:
    return [
        ImageJob(i, engine.to_device(image), engine.to_device(engine.resize_for_sam(image)), nouns)
        for i, (image, nouns) in enumerate(zip(images, NOUNS, strict=True))
    ]


def _same(a, b) -> None:
    assert (a.num_proposals, a.num_generated, a.num_matches) == (b.num_proposals, b.num_generated, b.num_matches)
    assert len(a.matches) == len(b.matches)
    for x, y in zip(a.matches, b.matches, strict=True):
        assert np.array_equal(x.runs, y.runs)
        assert {k: v for k, v in vars(x).items() if k != "runs"} == {k: v for k, v in vars(y).items() if k != "runs"}


@pytest.mark.parametrize("encoder_batch", [1, 2])
def test_a_batch_gives_what_each_image_gives_alone(images, encoder_batch):
    engine = _engine(f"sam.encoder_batch_size={encoder_batch}", "clip.batch_size=8")
    jobs = _jobs(engine, images)
    together = engine.mine(jobs)
    assert [o.num_proposals for o in together] == [16, 16, 16]  # the smoke recipe's cap
    for job, outcome in zip(jobs, together, strict=True):
        _same(engine.mine([job])[0], outcome)
        assert [m.noun_index for m in outcome.matches] == list(range(len(job.nouns)))
        assert set(outcome.seconds) == {"proposals", "crops", "clip"}


def test_a_pooled_batch_gives_what_each_image_gives_alone(images):
    """A GPU's batching on the CPU: crops rendered in one gather op, CLIP over the batch's crops in the calls of
    matching.pooled_calls (64 halved to 32 here: each image's 16 crops in a call of 32, alone or pooled)."""
    engine = _engine("engine.batching='pooled'", "clip.batch_size=64", "engine.profile_steps=true")
    jobs = _jobs(engine, images)
    for job, outcome in zip(jobs, engine.mine(jobs), strict=True):
        _same(engine.mine([job])[0], outcome)


def test_matches_are_the_single_image_proposals_and_per_mask_crops(images):
    from ovseg_mine.crops import normalize, render_masked_crops
    from ovseg_mine.mine.algorithms.matching import encode_crops, match_nouns
    from ovseg_mine.mine.algorithms.proposals import SamMaskGenerator

    engine = _engine()
    job = _jobs(engine, images)[1]
    outcome = engine.mine([job])[0]
    generator = SamMaskGenerator(copy.deepcopy(engine.sam.sam), engine.cfg.sam)
    props = generator(images[1])
    boxes = torch.from_numpy(props.bboxes).long()
    crops = render_masked_crops(job.image, props.masks, boxes, size=engine.input_size, fill=engine.fill)
    embeddings = encode_crops(engine.clip, normalize(crops, engine.mean, engine.std), batch_size=64)
    expected = match_nouns(embeddings, engine.text.embed(job.nouns))
    assert outcome.num_proposals == len(props) and outcome.num_generated == props.num_generated
    for match, want in zip(outcome.matches, expected, strict=True):
        m = match.mask_index
        assert m == want.mask_index
        assert rle.from_runs(match.runs, *images[1].shape[:2]) == props.rles[m]
        assert match.bbox == props.bboxes[m].tolist() and match.area == props.areas[m]
        assert match.predicted_iou == pytest.approx(float(props.predicted_iou[m]), abs=1e-7)
        assert match.similarity == pytest.approx(want.similarity, abs=1e-6)
        assert match.probability == pytest.approx(want.probability, abs=1e-5)


def test_pooled_and_per_image_batching_give_the_same_pairs(images):
    loop, batched = _engine("engine.batching='per_image'"), _engine("engine.batching='pooled'")
    for a, b in zip(loop.mine(_jobs(loop, images)), batched.mine(_jobs(batched, images)), strict=True):
        assert [(m.noun_index, m.mask_index) for m in a.matches] == [(m.noun_index, m.mask_index) for m in b.matches]
        for x, y in zip(a.matches, b.matches, strict=True):
            assert abs(x.similarity - y.similarity) < 1e-4


def test_thresholds_and_failures_stay_per_image(images):
    engine = _engine("matching.min_similarity=1.0")
    jobs = _jobs(engine, images)
    bad = ImageJob(99, jobs[0].image, jobs[0].sam_image[:2], ["cat"])  # two channels: SAM's preprocessing raises
    outcomes = engine.mine_each([jobs[0], bad, jobs[2]])
    assert isinstance(outcomes[1], RuntimeError)
    assert outcomes[0].matches == [] and outcomes[0].num_matches == 2  # every noun below the threshold
    assert outcomes[2].num_matches == 1


def test_given_masks_run_through_the_same_crops_and_matching_as_sams_own(images):
    from ovseg_mine.mine.algorithms.proposals import SamMaskGenerator

    engine = _engine()
    sam_jobs = _jobs(engine, images)
    props = SamMaskGenerator(copy.deepcopy(engine.sam.sam), engine.cfg.sam)(images[1])
    entries = [
        {"segmentation": r, "bbox": None, "predicted_iou": float(i), "stability_score": float(s)}
        for r, i, s in zip(props.rles, props.predicted_iou, props.stability_score, strict=True)
    ]
    entries.reverse()  # the file's order does not matter: scored masks are ranked by predicted IoU
    given = ImageJob(7, sam_jobs[1].image, None, NOUNS[1], given=engine.given_masks(entries, images[1].shape[:2]))
    outcomes = engine.mine([sam_jobs[0], given, sam_jobs[2]])
    alone = engine.mine([sam_jobs[1]])[0]
    alone.num_generated = len(entries)  # given masks: how many the file gave
    _same(outcomes[1], alone)
    _same(outcomes[0], engine.mine([sam_jobs[0]])[0])
    no_sam = MiningEngine(engine.cfg, None, engine.clip, engine.text.tokenizer, torch.device("cpu"))
    unscored = [{**e, "predicted_iou": None, "stability_score": None} for e in entries]
    outcome = no_sam.mine([ImageJob(7, given.image, None, ["dog"], given=no_sam.given_masks(unscored, given.size))])[0]
    assert outcome.num_proposals == len(props) and outcome.num_generated == len(entries)
    assert outcome.matches[0].predicted_iou is None and outcome.matches[0].stability_score is None
    chosen = len(props) - 1 - outcome.matches[0].mask_index  # unscored masks keep the file's (reversed) order
    assert rle.from_runs(outcome.matches[0].runs, *given.size) == props.rles[chosen]
    assert outcome.matches[0].bbox == props.bboxes[chosen].tolist()


def test_fused_kernels_give_the_stock_pairs_and_a_batch_what_each_image_gives(images):
    """engine.kernels='fused' (several images selected at once, crops from low-resolution logits) against 'stock'
    (today's per-image selection and crops of full-resolution masks): the same matches and masks, similarities
    within float rounding; and a fused batch gives what each of its images gives alone."""
    stock, fused = _engine("engine.kernels='stock'", "engine.batching='pooled'"), _engine("engine.kernels='fused'")
    assert fused.fused and not stock.fused and _engine("engine.device_rules='cuda'").fused
    fused_jobs = _jobs(fused, images)
    together = fused.mine(fused_jobs)
    for a, b in zip(stock.mine(_jobs(stock, images)), together, strict=True):
        assert (a.num_proposals, a.num_generated) == (b.num_proposals, b.num_generated)
        assert [(m.noun_index, m.mask_index, m.area, m.bbox) for m in a.matches] == [
            (m.noun_index, m.mask_index, m.area, m.bbox) for m in b.matches
        ]
        for x, y in zip(a.matches, b.matches, strict=True):
            assert np.array_equal(x.runs, y.runs) and abs(x.similarity - y.similarity) < 1e-4
    for job, outcome in zip(fused_jobs, together, strict=True):
        _same(fused.mine([job])[0], outcome)


def test_engine_kernels_pick_the_decoder():
    """``engine.kernels``: ``auto`` is the fused decoder under a GPU's rules, stock otherwise; an explicit choice
    wins."""
    assert _engine().sam.kernels == "stock"
    assert _engine("engine.device_rules=cuda").sam.kernels == "fused"
    assert _engine("engine.kernels=fused").sam.kernels == "fused"
    assert _engine("engine.device_rules=cuda", "engine.kernels=stock").sam.kernels == "stock"
