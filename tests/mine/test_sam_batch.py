"""SAM on batches (ovseg_mine.mine.algorithms.sam_batch, sam_attention) with the tiny SAM: padded encoder batches, SDPA
attention, decoder prompt batches, the float32 IoU head."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_mine.mine.algorithms.sam_attention import use_sdpa
from ovseg_mine.mine.algorithms.sam_batch import BatchedSam
from ovseg_mine.models import load_sam


@pytest.fixture(scope="module")
def sam():
    model, _ = load_sam("tiny", "random", seed=0)
    return model


@pytest.fixture(scope="module")
def resized(sample, sam):
    batched = BatchedSam(copy.deepcopy(sam), points_per_side=2, points_per_batch=4)
    paths = sorted((sample / "images").glob("*.jpg"))[:2]
    return [torch.from_numpy(batched.resize(np.asarray(Image.open(p).convert("RGB")))).permute(2, 0, 1) for p in paths]


def test_an_images_features_do_not_depend_on_its_batch(sam, resized):
    batched = BatchedSam(copy.deepcopy(sam), points_per_side=2, points_per_batch=4, encoder_batch_size=2)
    alone = batched.embed(resized[:1])  # padded with a zero image to the batch size
    together = batched.embed(resized)
    assert alone.shape == (1, *together.shape[1:])
    assert torch.equal(alone[0], together[0])
    stock = copy.deepcopy(sam)
    with torch.inference_mode():
        x = stock.preprocess(resized[0][None])
        assert torch.allclose(stock.image_encoder(x)[0], together[0], atol=1e-5)


def test_sdpa_attention_equals_segment_anythings_up_to_rounding(sam, resized):
    stock = copy.deepcopy(sam).image_encoder
    fast = copy.deepcopy(sam).image_encoder
    assert use_sdpa(fast) == len(fast.blocks)
    with torch.inference_mode():
        x = sam.preprocess(resized[0][None])
        torch.testing.assert_close(fast(x), stock(x), atol=1e-5, rtol=1e-5)


def test_decoder_prompt_batches_change_rounding_only(sam, resized):
    small = BatchedSam(copy.deepcopy(sam), points_per_side=4, points_per_batch=3)
    large = BatchedSam(copy.deepcopy(sam), points_per_side=4, points_per_batch=16)
    features = small.embed(resized[:1])
    size = (480, 640)
    a, b = small.decode(features, size), large.decode(features, size)
    assert a[0].shape == (48, 64, 64) and a[1].shape == (48,)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # kernels of another shape: rounding differs


def test_low_precision_keeps_the_iou_head_in_float32(sam, resized):
    batched = BatchedSam(copy.deepcopy(sam), points_per_side=2, points_per_batch=4, precision="pure_bf16")
    assert next(batched.sam.image_encoder.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in batched.sam.mask_decoder.iou_prediction_head.parameters())
    low, iou = batched.decode(batched.embed(resized[:1]), (480, 640))
    assert iou.dtype == torch.float32 and low.shape == (12, 64, 64)
    with pytest.raises(ValueError, match="precision"):
        BatchedSam(copy.deepcopy(sam), points_per_side=2, points_per_batch=4, precision="int8")


def test_cached_point_prompts_equal_the_prompt_encoders(sam):
    """The grid's sparse embeddings are computed without the prompt encoder's bool-mask assignments (host syncs
    on a GPU); they equal what ``PromptEncoder`` gives for the same points, bit for bit, for every image size."""
    batched = BatchedSam(copy.deepcopy(sam), points_per_side=4, points_per_batch=8)
    encoder = batched.sam.prompt_encoder
    with torch.no_grad():  # random embeddings: the stock tiny model's are too regular to tell rows apart
        for embedding in (encoder.not_a_point_embed, encoder.point_embeddings[1]):
            embedding.weight.normal_(generator=torch.Generator().manual_seed(1))
    for size in [(480, 640), (640, 427), (333, 500)]:
        points = batched.point_grid * np.array([size[1], size[0]])
        coords = torch.as_tensor(batched.transform.apply_coords(points, size))[:, None, :]
        with torch.inference_mode():
            stock, _ = encoder(points=(coords, torch.ones((len(points), 1), dtype=torch.int)), boxes=None, masks=None)
        ours = batched._sparse_prompts(size)
        assert ours.shape == (16, 2, encoder.embed_dim)
        assert torch.equal(ours, stock)
