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


def test_pooled_calls_pad_a_batch_by_less_than_the_smallest_call_in_a_few_shapes():
    from ovseg_mine.mine.algorithms.matching import call_sizes, pooled_calls

    assert call_sizes(256) == (256, 128, 64, 32) and call_sizes(8) == (8,) and call_sizes(100, 32) == (100, 50)
    counts = [100] * 8  # the batch: 8 images of 100 crops, which padding to 256 made 1,024
    calls = pooled_calls(counts, 256)
    assert sum(size for size, _ in calls) == 800 and {size for size, _ in calls} == {64, 32}
    for counts in ([100] * 8, [300, 5, 0, 77, 256, 31], [1], []):
        calls = pooled_calls(counts, 256)
        covered = sorted(r for _, ranges in calls for r in ranges)
        assert [i for a, b in covered for i in range(a, b)] == list(range(sum(counts)))  # each crop once
        assert all(sum(b - a for a, b in ranges) <= size for size, ranges in calls)
        assert 0 <= sum(size for size, _ in calls) - sum(counts) < 32
        assert [size for size, ranges in calls if sum(b - a for a, b in ranges) < size] in ([], [32])
    with pytest.raises(ValueError, match="at least 1"):
        call_sizes(0)


def test_pooled_crops_embed_as_each_image_alone_and_as_the_padded_calls():
    """The determinism contract: an image's crops go through calls of the shapes its own count decides, so its
    embeddings are bit-identical in any batch; and equal to encode_crops' calls padded to batch_size."""
    from ovseg_mine.mine.algorithms.matching import encode_crops, encode_crops_pooled
    from ovseg_mine.models import clip_input_size, load_clip

    model, _, _ = load_clip("ovseg-tiny-vit", "random", seed=0)
    side = clip_input_size(model)
    counts = [23, 5, 0, 9, 16]
    crops = torch.randn(sum(counts), 3, side, side, generator=torch.Generator().manual_seed(0))
    pooled = encode_crops_pooled(model, crops, counts, batch_size=16, smallest=4)
    assert pooled.shape[0] == sum(counts)
    start = 0
    for count in counts:
        alone = encode_crops_pooled(model, crops[start : start + count], [count], batch_size=16, smallest=4)
        assert torch.equal(alone, pooled[start : start + count]) if count else alone.numel() == 0
        start += count
    padded = encode_crops(model, crops, batch_size=16)
    torch.testing.assert_close(pooled, padded, rtol=0, atol=1e-6)
