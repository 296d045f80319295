import math

import pytest
import torch

from ovseg_mine.config import MatchingConfig
from ovseg_mine.mine.algorithms.matching import best_masks, match_nouns, passes_thresholds
from ovseg_mine.text import NounEmbeddings


def _unit(*rows):
    t = torch.tensor(rows, dtype=torch.float32)
    return t / t.norm(dim=1, keepdim=True)


def test_each_noun_gets_its_most_similar_mask_with_scores():
    # 3 masks, 2 nouns in 2-D: noun 0 points at mask 1, noun 1 at mask 2.
    masks = _unit([1.0, 0.0], [0.6, 0.8], [0.0, 1.0])
    nouns = _unit([0.5, 0.8660254], [0.0, 1.0])
    sims = nouns @ masks.T
    matches = match_nouns(masks, nouns, logit_scale=100.0)
    assert [(m.noun_index, m.mask_index) for m in matches] == [(0, 1), (1, 2)]
    assert matches[0].similarity == pytest.approx(sims[0, 1].item(), abs=1e-6)
    assert matches[0].margin == pytest.approx((sims[0, 1] - sims[0, 2]).item(), abs=1e-6)
    assert matches[1].margin == pytest.approx((sims[1, 2] - sims[1, 1]).item(), abs=1e-6)
    # probability: softmax over the image's nouns at the chosen mask
    logits = 100.0 * sims[:, 1]
    assert matches[0].probability == pytest.approx(torch.softmax(logits, 0)[0].item(), rel=1e-5)
    logits = 100.0 * sims[:, 2]
    assert matches[1].probability == pytest.approx(torch.softmax(logits, 0)[1].item(), rel=1e-5)


def test_single_mask_and_single_noun():
    matches = match_nouns(_unit([1.0, 0.0]), _unit([1.0, 1.0]))
    assert len(matches) == 1 and matches[0].mask_index == 0
    assert matches[0].margin is None
    assert matches[0].probability == pytest.approx(1.0)
    assert matches[0].similarity == pytest.approx(math.sqrt(0.5), abs=1e-6)
    assert match_nouns(torch.zeros((0, 2)), _unit([1.0, 0.0])) == []


def test_ties_pick_the_lowest_mask_index():
    masks = _unit([1.0, 0.0], [1.0, 0.0])
    (match,) = match_nouns(masks, _unit([1.0, 0.0]))
    assert match.mask_index == 0 and match.margin == pytest.approx(0.0)


def test_thresholds():
    _, sims, probs, margins = best_masks(_unit([1.0, 0.0], [0.0, 1.0]), _unit([1.0, 0.2]))
    assert passes_thresholds(sims, probs, margins, MatchingConfig()).tolist() == [True]  # the paper keeps all
    assert not passes_thresholds(sims, probs, margins, MatchingConfig(min_similarity=0.99)).any()
    assert not passes_thresholds(sims, probs, margins, MatchingConfig(min_margin=0.9)).any()
    assert passes_thresholds(sims, probs, margins, MatchingConfig(min_margin=0.5)).all()
    _, sims, probs, margins = best_masks(_unit([1.0, 0.0]), _unit([1.0, 0.2]))  # one mask: no runner-up
    assert passes_thresholds(sims, probs, margins, MatchingConfig(min_margin=0.9)).all()


def test_bf16_clip_gives_float32_embeddings_close_to_fp32():
    from ovseg_mine.mine.algorithms.matching import encode_crops
    from ovseg_mine.models import load_clip
    from ovseg_mine.precision import cast_model

    fp32, tokenizer, _ = load_clip("ovseg-tiny-vit", "random", device="cpu", seed=0)
    bf16, _, _ = load_clip("ovseg-tiny-vit", "random", device="cpu", seed=0)
    assert cast_model(bf16, "pure_bf16") is bf16 and next(bf16.parameters()).dtype == torch.bfloat16
    crops = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a = encode_crops(fp32, crops, batch_size=4)
    b = encode_crops(bf16, crops, batch_size=4)
    assert b.dtype == torch.float32 and b.shape == a.shape
    assert torch.allclose(b.norm(dim=1), torch.ones(6), atol=1e-5)
    assert (a * b).sum(dim=1).min() > 0.99  # cosine to the fp32 embedding
    text_a = NounEmbeddings(fp32, tokenizer, "cpu").embed(["dog", "fire hydrant"])
    text_b = NounEmbeddings(bf16, tokenizer, "cpu", precision="pure_bf16").embed(["dog", "fire hydrant"])
    assert text_b.dtype == torch.float32 and (text_a * text_b).sum(dim=1).min() > 0.99
