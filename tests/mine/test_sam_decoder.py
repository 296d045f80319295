"""The fused SAM mask decoder (ovseg_mine.mine.algorithms.sam_decoder) against segment-anything's MaskDecoder: the
tiny SAM and a vit_b-shaped decoder with random weights and features, float32 and bfloat16, the proposals of a
real image through BatchedSam, and one graph under torch.compile."""

import copy
import types

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from ovseg_mine.config import SamConfig
from ovseg_mine.mine.algorithms.sam_batch import BatchedSam
from ovseg_mine.mine.algorithms.sam_decoder import FusedDecoder
from ovseg_mine.models import load_sam


@pytest.fixture(scope="module")
def tiny():
    """The tiny SAM with its decoder's and prompt encoder's weights drawn wider than their init (a stock init
    gives near-constant masks, which would hide a wrong pixel order)."""
    sam, _ = load_sam("tiny", "random", seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [*sam.mask_decoder.parameters(), *sam.prompt_encoder.parameters()]:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return sam.eval()


@pytest.fixture(scope="module")
def vit_b_decoder():
    """SAM vit_b's decoder and prompt encoder (segment_anything's shapes: 256 channels, 64x64 tokens, 8 heads,
    MLP 2048), default random init, as a stand-in ``Sam``."""
    torch.manual_seed(0)
    return types.SimpleNamespace(
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
        ).eval(),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
        ).eval(),
    )


def _prompts(encoder, count: int, seed: int) -> torch.Tensor:
    """Sparse embeddings ``[count, 2, C]`` of random positive points."""
    side = encoder.input_image_size[0]
    coords = torch.rand((count, 1, 2), generator=torch.Generator().manual_seed(seed)) * side
    with torch.inference_mode():
        sparse, _ = encoder(points=(coords, torch.ones((count, 1), dtype=torch.int)), boxes=None, masks=None)
    return sparse


def _stock(sam, features: torch.Tensor, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """segment-anything's decoder as the AMG calls it (``predict_torch(multimask_output=True)``)."""
    encoder, dtype = sam.prompt_encoder, sam.mask_decoder.mask_tokens.weight.dtype
    dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(len(sparse), -1, *encoder.image_embedding_size)
    with torch.inference_mode():
        return sam.mask_decoder(
            image_embeddings=features.to(dtype),
            image_pe=encoder.get_dense_pe().to(dtype),
            sparse_prompt_embeddings=sparse.to(dtype),
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=True,
        )


def _fused(sam, features: torch.Tensor, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    decoder = FusedDecoder(sam)
    with torch.inference_mode():
        return decoder.step(decoder.context(features), sparse)


def test_fused_equals_stock_in_float32_on_the_tiny_sam(tiny):
    features = torch.randn((1, 32, 16, 16), generator=torch.Generator().manual_seed(1))
    sparse = _prompts(tiny.prompt_encoder, 6, seed=2)
    (low, iou), (ref_low, ref_iou) = _fused(tiny, features, sparse), _stock(tiny, features, sparse)
    assert low.shape == ref_low.shape == (6, 3, 64, 64) and iou.shape == (6, 3) and iou.dtype == torch.float32
    assert ref_low.std() > 0.1 * ref_low.abs().max()  # masks that vary over the image: the pixel order matters
    torch.testing.assert_close(low, ref_low, atol=1e-5, rtol=1e-5)  # measured max |diff| 4.1e-7 (logits up to 0.34)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-5)  # measured 7e-7


def test_fused_equals_stock_in_float32_on_a_vit_b_shaped_decoder(vit_b_decoder):
    features = torch.randn((1, 256, 64, 64), generator=torch.Generator().manual_seed(1))
    sparse = _prompts(vit_b_decoder.prompt_encoder, 4, seed=2)
    (low, iou), (ref_low, ref_iou) = _fused(vit_b_decoder, features, sparse), _stock(vit_b_decoder, features, sparse)
    assert low.shape == ref_low.shape == (4, 3, 256, 256)
    torch.testing.assert_close(low, ref_low, atol=1e-5, rtol=1e-5)  # measured max |diff| 3.3e-7 (logits up to 0.42)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-5)  # measured 4e-8


def test_fused_in_bfloat16_is_as_close_to_float32_as_stock_in_bfloat16(vit_b_decoder):
    """With bfloat16 weights (a GPU's rules; the IoU head float32), the fused decoder's rounding error against
    float32 is no larger than segment-anything's own decoder's in bfloat16 (the fused one normalises in float32
    inside ``layer_norm``; the stock one rounds every step of ``LayerNorm2d``)."""
    features = torch.randn((1, 256, 64, 64), generator=torch.Generator().manual_seed(3))
    sparse = _prompts(vit_b_decoder.prompt_encoder, 2, seed=4)
    ref_low, ref_iou = _stock(vit_b_decoder, features, sparse)
    low16 = copy.deepcopy(vit_b_decoder)
    low16.mask_decoder.to(torch.bfloat16)  # the fused decoder's IoU head: float32 copies of these weights
    stock_low, _ = _stock(low16, features, sparse)
    low, iou = _fused(low16, features, sparse)
    assert low.dtype == torch.bfloat16 and iou.dtype == torch.float32
    fused_err, stock_err = (low.float() - ref_low).abs().max(), (stock_low.float() - ref_low).abs().max()
    assert fused_err <= 1.5 * stock_err  # measured: fused 4.3e-3, stock 4.6e-3 (logits up to 0.35)
    torch.testing.assert_close(iou, ref_iou, atol=0.01, rtol=0.0)  # measured 1.5e-3 (stock bf16: 1.6e-3)


def test_step_is_one_graph_under_dynamo(tiny):
    decoder = FusedDecoder(tiny)
    features = torch.randn((1, 32, 16, 16), generator=torch.Generator().manual_seed(1))
    sparse = _prompts(tiny.prompt_encoder, 4, seed=2)
    with torch.inference_mode():
        context = decoder.context(features)
        explanation = torch._dynamo.explain(decoder.step)(context, sparse)
        into = torch._dynamo.explain(decoder.step)(context, sparse, out=torch.empty((4, 3, 64, 64)))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    assert into.graph_break_count == 0 and into.graph_count == 1, into.break_reasons


def test_compiled_step_equals_eager(tiny):
    """The step under ``torch.compile(fullgraph=True)`` (inductor, as ``BatchedSam(compile=True)`` runs it on a
    GPU) gives the eager masks, written into ``out`` (an ``out=`` into a fresh tensor once broke inductor's
    functionalization: the eager GELUs now take another form when compiling)."""
    decoder = FusedDecoder(tiny)
    features = torch.randn((1, 32, 16, 16), generator=torch.Generator().manual_seed(1))
    sparse = _prompts(tiny.prompt_encoder, 4, seed=2)
    with torch.inference_mode():
        context = decoder.context(features)
        ref_low, ref_iou = decoder.step(context, sparse)
        out = torch.empty((4, 3, 64, 64))
        low, iou = torch.compile(decoder.step, fullgraph=True)(context, sparse, out=out)
    assert low.data_ptr() == out.data_ptr()
    torch.testing.assert_close(low, ref_low, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-5)


def test_bad_features_are_refused(tiny):
    with pytest.raises(ValueError, match="features must be"):
        FusedDecoder(tiny).context(torch.zeros((2, 32, 16, 16)))
    with pytest.raises(ValueError, match="kernels"):
        BatchedSam(copy.deepcopy(tiny), points_per_side=2, points_per_batch=4, kernels="triton")


def test_proposals_of_a_real_image_match_stock(tiny, sample):
    """The AMG's kept proposals of a sample image with each decoder: the same number of masks, each one's IoU
    with its stock counterpart at least 0.99."""
    image = np.asarray(Image.open(sorted((sample / "images").glob("*.jpg"))[0]).convert("RGB"))
    size = image.shape[:2]
    cfg = SamConfig(model_type="tiny", pred_iou_thresh=0.5, stability_score_thresh=0.5, box_nms_thresh=1.0)
    sam = copy.deepcopy(tiny)
    with torch.no_grad():  # logits of a few units (SAM's are): stability scores (offset 1.0) other than 0
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(30.0)
    sets = {}
    for kernels in ("stock", "fused"):
        batched = BatchedSam(copy.deepcopy(sam), points_per_side=6, points_per_batch=12, kernels=kernels)
        resized = torch.from_numpy(batched.resize(image)).permute(2, 0, 1)
        sets[kernels] = batched.propose(batched.embed([resized]), size, cfg, chunk_bytes=1 << 26)
    stock, fused = sets["stock"], sets["fused"]
    assert len(stock) == len(fused) > 10
    torch.testing.assert_close(fused.predicted_iou, stock.predicted_iou, atol=1e-5, rtol=0.0)
    index = torch.arange(len(stock))
    a, b = stock.masks(index), fused.masks(index)
    iou = (a & b).flatten(1).sum(1) / (a | b).flatten(1).sum(1).clamp(min=1)
    print(f"{len(stock)} masks, IoU with stock: min {iou.min():.5f}, mean {iou.mean():.5f}")
    assert iou.min() >= 0.99, iou.min()


def test_batched_sam_fused_under_cpu_autocast_is_as_close_as_stock(tiny):
    """``pure_bf16`` on a CPU runs the decoder under bfloat16 autocast (float32 weights), fused as stock; each
    one's error against float32 stock is of the same size (measured: masks 7.2e-3 fused, 6.7e-3 stock; IoUs 9.7e-3
    fused, 1.3e-2 stock)."""
    features = torch.randn((1, 32, 16, 16), generator=torch.Generator().manual_seed(1))
    out = {}
    for precision in ("fp32", "pure_bf16"):
        for kernels in ("stock", "fused"):
            batched = BatchedSam(
                copy.deepcopy(tiny), points_per_side=4, points_per_batch=8, precision=precision, kernels=kernels
            )
            out[precision, kernels] = batched.decode(features, (480, 640))
    ref_low, ref_iou = out["fp32", "stock"]
    low, iou = out["fp32", "fused"]
    assert low.shape == ref_low.shape == (48, 64, 64) and iou.dtype == torch.float32
    torch.testing.assert_close(low, ref_low, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-5)
    (stock_low, stock_iou), (low, iou) = out["pure_bf16", "stock"], out["pure_bf16", "fused"]
    assert low.dtype == stock_low.dtype == torch.bfloat16 and iou.dtype == torch.float32
    assert (low.float() - ref_low).abs().max() <= 1.5 * (stock_low.float() - ref_low).abs().max()
    assert (iou - ref_iou).abs().max() <= 1.5 * (stock_iou - ref_iou).abs().max()
