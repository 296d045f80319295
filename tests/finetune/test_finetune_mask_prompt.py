"""Mask prompt tuning: hooks on real open_clip ViTs (tiny, random), the patch mask, gradients."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from ovseg_mine.finetune.loss import noun_contrastive_loss, unique_targets
from ovseg_mine.finetune.mask_prompt import MaskPromptError, MaskPrompts, is_vit_arch, load_prompts, save_prompts
from ovseg_mine.finetune.patch_mask import crop_masks, patch_foreground
from ovseg_mine.finetune.stage import ImageTower
from ovseg_mine.models import load_clip


@pytest.fixture(scope="module", params=["ovseg-tiny-vit", "test-vit-p8-56"])
def clip(request, tmp_path_factory):
    """The tiny ViT of the smoke recipe, and another shape: 56 px input, patch 8 (7x7 grid), 3 blocks."""
    if request.param == "test-vit-p8-56":
        folder = tmp_path_factory.mktemp("cfg")
        (folder / "test-vit-p8-56.json").write_text(
            json.dumps(
                {
                    "embed_dim": 32,
                    "vision_cfg": {"image_size": 56, "layers": 3, "width": 48, "head_width": 24, "patch_size": 8},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
                }
            )
        )
        open_clip.add_model_config(folder)
    model, _tok, _info = load_clip(request.param, "random", seed=1)
    return model


def _inputs(model, n=3, seed=0):
    size = model.visual.image_size[0]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def test_zero_prompts_and_all_foreground_equal_the_plain_model(clip):
    images = _inputs(clip)
    with torch.no_grad():
        plain = clip.visual(images)
        prompts = MaskPrompts(clip.visual, depth=2)
        prompts.prompts.zero_()
        n = prompts.prompts.shape[1]
        out_fg = prompts(images, torch.ones(3, n, dtype=torch.bool))
        prompts.prompts.normal_()  # prompts do not matter when nothing is masked
        out_fg2 = prompts(images, torch.ones(3, n, dtype=torch.bool))
        prompts.remove()
        after = clip.visual(images)
    torch.testing.assert_close(out_fg, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(out_fg2, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)  # hooks removed: the plain model again


def test_masked_patches_and_only_those_change_with_the_prompts(clip):
    images = _inputs(clip, n=2)
    prompts = MaskPrompts(clip.visual, depth=2)
    n = prompts.prompts.shape[1]
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[0, [0, 3, n - 1]] = False  # three masked patches in image 0, none in image 1
    seen = {}
    batch_first = clip.visual.transformer.batch_first
    hooks = [
        clip.visual.ln_pre.register_forward_hook(lambda m, i, o: seen.__setitem__("input", o.detach().clone())),
        clip.visual.transformer.resblocks[0].register_forward_hook(
            lambda m, i, o: seen.__setitem__("block1", (o if batch_first else o.transpose(0, 1)).detach().clone())
        ),
    ]
    runs = []
    with torch.no_grad():
        for layer in (None, 0, 1):  # all zeros, then P[0] changed, then P[1] changed
            prompts.prompts.zero_()
            if layer is not None:  # random, not constant: LayerNorm would erase a constant shift
                prompts.prompts[layer] = torch.randn(
                    prompts.prompts[layer].shape, generator=torch.Generator().manual_seed(5)
                )
            final = prompts(images, keep)
            runs.append({**seen, "final": final})
    for h in hooks:
        h.remove()
    prompts.remove()
    expect = torch.zeros(2, 1 + n, dtype=torch.bool)
    expect[:, 1:] = ~keep
    for run, where in ((1, "input"), (2, "block1")):  # the layer whose prompt changed: masked tokens only
        changed = (runs[0][where] - runs[run][where]).abs().amax(dim=-1) > 0  # [B, 1 + n]
        assert torch.equal(changed, expect), where  # class token and foreground patches untouched
    p1 = torch.randn(prompts.prompts[1].shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(runs[2]["block1"][0, 1:][~keep[0]], p1[~keep[0]])  # after block 1, masked tokens are P[1]
    for run in (1, 2):  # an image without masked patches gives the same embedding whatever the prompts
        torch.testing.assert_close(runs[run]["final"][1], runs[0]["final"][1], rtol=0, atol=0)
        assert not torch.allclose(runs[run]["final"][0], runs[0]["final"][0])


def test_only_prompts_receive_gradients(clip):
    model = clip
    model.requires_grad_(False)
    prompts = MaskPrompts(model.visual, depth=2)
    tower = ImageTower(model.visual, prompts)
    size = model.visual.image_size[0]
    masks = torch.zeros(4, size, size, dtype=torch.bool)
    masks[:, : size // 2, : size // 2] = True
    feats = tower(_inputs(model, n=4), masks)
    text = torch.nn.functional.normalize(torch.randn(3, feats.shape[1]), dim=-1)
    _, targets = unique_targets(["a", "b", "a", "c"])
    noun_contrastive_loss(feats, text, targets, 14.3).backward()
    prompts.remove()
    assert prompts.prompts.grad is not None and prompts.prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_patch_mask_of_a_known_mask():
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 20, 5] = True  # one pixel: patch row 1, column 0 of a 4x4 grid of 16-pixel patches
    mask[0, 63, 63] = True  # last pixel: last patch
    fg = patch_foreground(mask, 16)
    expect = torch.zeros(1, 16, dtype=torch.bool)
    expect[0, [4, 15]] = True
    assert torch.equal(fg, expect)
    full = torch.zeros(1, 64, 64, dtype=torch.bool)
    full[0, 16:32, 16:48] = True  # exactly patches (1,1) and (1,2)
    assert patch_foreground(full, 16)[0].nonzero().flatten().tolist() == [5, 6]
    with pytest.raises(ValueError):
        patch_foreground(torch.zeros(1, 60, 64, dtype=torch.bool), 16)


def test_crop_mask_follows_the_crop_box():
    mask = torch.zeros(1, 10, 20, dtype=torch.bool)
    mask[0, 2:4, 10:20] = True  # box x=10 y=2 w=10 h=2; left half of the box is the object
    mask[0, 2:4, 15:20] = False
    out = crop_masks(mask, torch.tensor([[10, 2, 10, 2]]), size=8)
    assert out.shape == (1, 8, 8)
    assert out[0, :, :4].all() and not out[0, :, 4:].any()


def test_saved_prompts_load_back(clip, tmp_path):
    prompts = MaskPrompts(clip.visual, depth=2)
    save_prompts(prompts, tmp_path / "p.safetensors", arch="x")
    prompts.remove()
    again = load_prompts(tmp_path / "p.safetensors", clip)
    again.remove()
    assert torch.equal(again.prompts, prompts.prompts.detach())


def test_non_vit_and_too_deep_are_refused():
    assert is_vit_arch("ViT-B-32") and is_vit_arch("ViT-L-14") and is_vit_arch("ovseg-tiny-vit")
    assert not is_vit_arch("RN50") and not is_vit_arch("convnext_base")
    model, _, _ = load_clip("ovseg-tiny-vit", "random")
    with pytest.raises(MaskPromptError, match="--prompt-depth 2"):
        MaskPrompts(model.visual, depth=3)
    with pytest.raises(MaskPromptError, match="VisionTransformer"):
        MaskPrompts(torch.nn.Linear(2, 2))


def test_loss_is_clip_loss_when_nouns_are_distinct_and_treats_repeats_as_positives():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    logits = 10 * img @ txt.T
    clip_loss = (
        torch.nn.functional.cross_entropy(logits, torch.arange(4))
        + torch.nn.functional.cross_entropy(logits.T, torch.arange(4))
    ) / 2
    torch.testing.assert_close(noun_contrastive_loss(img, txt, torch.arange(4), 10.0), clip_loss)
    # two crops of the same noun, both aligned with it: near-zero loss (CLIP's loss would push them apart)
    unique, targets = unique_targets(["cat", "dog", "cat"])
    assert unique == ["cat", "dog"] and targets.tolist() == [0, 1, 0]
    t = torch.eye(2, 8)
    i = torch.stack([t[0], t[1], t[0]])
    assert float(noun_contrastive_loss(i, t, targets, 100.0)) < 1e-3
    naive = torch.stack([t[0], t[1], t[0]])  # CLIP's loss, the repeated noun as a separate text: log(2) per cat crop
    assert float(torch.nn.functional.cross_entropy(100 * i @ naive.T, torch.arange(3))) > 0.4
