"""Mask prompt tuning (OVSeg, Liang et al., CVPR 2023, Sec. 3.4) on an unmodified open_clip VisionTransformer.

A learnable prompt ``P`` of shape ``[depth, n_patches, width]`` (init N(0, 0.02)) stands in for the
tokens of fully-masked patches, one prompt per patch position and per layer:

* at the input, the patch embeddings (``visual.conv1`` output, before the positional embedding, as in the
  reference) become ``x * m + P[0] * (1 - m)``, with ``m = 1`` on a patch holding any foreground pixel;
* after transformer block ``d`` (1-based, i.e. ``resblocks[d - 1]``) for ``1 <= d < depth``, the masked
  patch tokens are replaced by ``P[d]`` the same way;
* the class token is never touched, and a foreground patch is never changed.

The reference (facebookresearch/ov-seg: ``third_party/CLIP/clip/model.py`` in the segmentation model,
``open_clip_training/src/open_clip/model.py`` in prompt tuning; the ``mask_embedding`` of its forked
``VisionTransformer``) edits the model's forward; here the same arithmetic
runs in forward hooks on ``visual.conv1`` and ``visual.transformer.resblocks``, so any open_clip ViT (B/32,
B/16, L/14, any input size, batch-first or not) works without copying open_clip's code. With no mask given
the hooks do nothing and the model is the plain model.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from ovseg_mine.storage import resolve

if TYPE_CHECKING:
    from pathlib import Path

    from ovseg_mine.storage import Location

PROMPTS_FILE = "mask_prompts.safetensors"


class MaskPromptError(ValueError):
    """A model that mask prompt tuning cannot wrap (not an open_clip ViT, depth too large, patch dropout)."""


def is_vit_arch(arch: str) -> bool:
    """True when the open_clip architecture's image tower is open_clip's own VisionTransformer.

    Decided from the model config, without building the model: a ``timm_model_name`` or a list of
    ``layers`` (ModifiedResNet) is not. Unknown architectures give False.
    """
    import open_clip

    from ovseg_mine.resources import register_clip_configs

    register_clip_configs()  # this package's test architectures (ovseg-tiny-vit)
    cfg = open_clip.get_model_config(arch) or {}
    vision = cfg.get("vision_cfg", {})
    return bool(vision) and not vision.get("timm_model_name") and isinstance(vision.get("layers", 12), int)


class MaskPrompts(nn.Module):
    """Learnable mask prompts attached to an open_clip ``VisionTransformer`` through forward hooks.

    Args:
        visual: ``model.visual`` of an open_clip CLIP with a ``VisionTransformer`` image tower. It is not
            copied; the hooks are registered on it (call :meth:`remove` to detach them).
        depth: number of prompted layers: the input plus the outputs of blocks 1..depth-1 (OVSeg: 3).
            At most the number of transformer blocks.
        init_std: std of the normal initialisation (OVSeg: 0.02, as MAE's mask token).

    Attributes:
        prompts: float32 Parameter ``[depth, grid_h * grid_w, width]``.

    Raises:
        MaskPromptError: ``visual`` is not an open_clip VisionTransformer, uses patch dropout (token
            positions would not be stable), or has fewer blocks than ``depth``.

    Use :meth:`forward` ``(images, patch_mask)`` to encode, or :meth:`masked` as a context manager around
    any call of the visual tower.
    """

    def __init__(self, visual: nn.Module, depth: int = 3, init_std: float = 0.02) -> None:
        super().__init__()
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise MaskPromptError(
                f"mask prompt tuning needs an open_clip VisionTransformer image tower, not {type(visual).__name__}"
            )
        if not isinstance(visual.patch_dropout, nn.Identity):
            raise MaskPromptError("mask prompt tuning cannot be used with patch dropout (it reorders tokens)")
        blocks = visual.transformer.resblocks
        if not 1 <= depth <= len(blocks):
            raise MaskPromptError(
                f"prompt depth {depth} must be between 1 and the {len(blocks)} transformer "
                f"blocks of this model (pass --prompt-depth {min(3, len(blocks))})"
            )
        self.grid = tuple(visual.grid_size)
        self.patch_size = tuple(visual.patch_size)
        width = visual.conv1.out_channels
        self.prompts = nn.Parameter(torch.randn(depth, self.grid[0] * self.grid[1], width) * init_std)
        self._batch_first = getattr(visual.transformer, "batch_first", True)
        self._keep: torch.Tensor | None = None  # float [B, n_patches, 1]: 1 keeps a token, 0 takes the prompt
        self._visual = [visual]  # a list: not a registered submodule (its weights are not ours to save)
        self._handles = [visual.conv1.register_forward_hook(self._input_hook)]
        for d in range(1, depth):
            self._handles.append(blocks[d - 1].register_forward_hook(self._block_hook(d)))

    @property
    def depth(self) -> int:
        """Prompted layers: the input plus the outputs of blocks 1..depth-1."""
        return self.prompts.shape[0]

    def _input_hook(self, _module: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor | None:
        if self._keep is None:
            return None
        b, c, gh, gw = out.shape
        keep = self._keep.to(out.dtype).transpose(1, 2).reshape(b, 1, gh, gw)
        prompt = self.prompts[0].to(out.dtype).T.reshape(1, c, gh, gw)
        return out * keep + prompt * (1 - keep)

    def _block_hook(self, d: int):
        def hook(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor | None:
            if self._keep is None:
                return None
            x = out if self._batch_first else out.transpose(0, 1)  # [B, L, width]
            n = self.prompts.shape[1]
            prefix, patches = x[:, : x.shape[1] - n], x[:, x.shape[1] - n :]
            keep = self._keep.to(x.dtype)
            patches = patches * keep + self.prompts[d].to(x.dtype)[None] * (1 - keep)
            x = torch.cat([prefix, patches], dim=1)
            return x if self._batch_first else x.transpose(0, 1)

        return hook

    @contextlib.contextmanager
    def masked(self, patch_mask: torch.Tensor) -> Iterator[None]:
        """Within the context, the visual tower applies the prompts for ``patch_mask``.

        Args:
            patch_mask: bool ``[B, grid_h * grid_w]``, True on foreground patches
                (:func:`ovseg_mine.finetune.patch_mask.patch_foreground`).
        """
        n = self.grid[0] * self.grid[1]
        if patch_mask.ndim != 2 or patch_mask.shape[1] != n:
            raise ValueError(f"patch_mask must be [B, {n}], got {tuple(patch_mask.shape)}")
        self._keep = patch_mask.to(self.prompts.device).float()[:, :, None]
        try:
            yield
        finally:
            self._keep = None

    def forward(self, images: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """Image features with mask prompts: float ``[B, embed_dim]``, not normalized (``visual(images)``).

        Args:
            images: float ``[B, 3, S, S]``, CLIP-normalized, S the model's input size.
            patch_mask: bool ``[B, n_patches]``, True on foreground patches.
        """
        with self.masked(patch_mask):
            return self._visual[0](images)

    def remove(self) -> None:
        """Detach the hooks: the visual tower is the plain model again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def save_prompts(prompts: MaskPrompts, path: "str | Path | Location", *, arch: str) -> None:
    """Write the prompts as safetensors (a local path or a URI, whole): tensor ``prompts`` float32
    ``[depth, n_patches, width]``, and string metadata ``arch``, ``depth``, ``grid`` (``"gh,gw"``) and
    ``patch_size`` (``"ph,pw"``)."""
    from safetensors.torch import save_file

    meta = {
        "arch": arch,
        "depth": str(prompts.depth),
        "grid": ",".join(map(str, prompts.grid)),
        "patch_size": ",".join(map(str, prompts.patch_size)),
        "format": "ovseg-mine mask prompts v1",
    }
    tensors = {"prompts": prompts.prompts.detach().float().cpu().contiguous()}
    resolve(path).write_via(lambda local: save_file(tensors, local, metadata=meta))


def load_prompts(path: "str | Path | Location", model: nn.Module) -> MaskPrompts:
    """Attach the mask prompts saved by :func:`save_prompts` to ``model.visual`` (hooks registered).

    Args:
        path: a ``mask_prompts.safetensors`` file (a local path or a URI).
        model: the open_clip CLIP model they were trained with (same architecture).

    Returns:
        A :class:`MaskPrompts` on the model's device; ``prompts(images, patch_mask)`` encodes with them.

    Raises:
        MaskPromptError: the file's prompts do not fit this model (depth, grid or width), or it has none.
    """
    from safetensors import safe_open

    with resolve(path).local_file() as local, safe_open(local, framework="pt") as handle:
        if "prompts" not in handle.keys():
            raise MaskPromptError(f"{path} holds no 'prompts' tensor")
        tensor = handle.get_tensor("prompts")
    module = MaskPrompts(model.visual, depth=tensor.shape[0])
    if tensor.shape != module.prompts.shape:
        module.remove()
        raise MaskPromptError(
            f"prompts in {path} have shape {tuple(tensor.shape)}, this model needs {tuple(module.prompts.shape)}"
        )
    with torch.no_grad():
        module.prompts.copy_(tensor)
    return module.to(next(model.parameters()).device)
