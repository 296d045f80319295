"""SAM's image-encoder attention through ``torch.nn.functional.scaled_dot_product_attention`` (SDPA).

segment-anything's ``modeling/image_encoder.py`` ``Attention.forward`` materialises the attention matrix, adds the
decomposed relative-position terms (MViTv2's ``add_decomposed_rel_pos``), takes the softmax and multiplies by the
values: three passes over a ``[B * heads, N, N]`` tensor (N = 4,096 tokens in the global-attention blocks of a
1024-pixel input). :func:`use_sdpa` replaces that forward with one SDPA call whose ``attn_mask`` is the same
relative-position term as an additive bias, ``rel_h[q, k_h] + rel_w[q, k_w]`` broadcast to ``[B, heads, N, N]``.
It is the same function (softmax(q k^T * scale + bias) v), computed with fused kernels: equal up to rounding.
The relative-position tables (``get_rel_pos``) depend only on the weights and are computed once.

Used for the low-precision path only (``pure_bf16`` / ``pure_fp16``): in fp32 SAM's own code runs unchanged, so
that proposals stay identical to the stock automatic mask generator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def _sdpa_forward(attn: Any, x: "torch.Tensor") -> "torch.Tensor":
    """SDPA version of ``segment_anything.modeling.image_encoder.Attention.forward``: x ``[B, H, W, C]`` in,
    ``[B, H, W, C]`` out."""
    import torch
    import torch.nn.functional as F

    b, h, w, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)  # [3, B, heads, N, C_head]
    q, k, v = qkv.unbind(0)
    bias = None
    if attn.use_rel_pos:
        rh, rw = attn._ovseg_rel_pos
        if rh.shape[0] != h or rw.shape[0] != w:  # an input size other than the one the tables were made for
            rh, rw = _rel_pos_tables(attn, h, w)
        r_q = q.reshape(b * heads, h, w, -1)
        # einsum returns these permuted: made contiguous (a few MB), the bias comes out contiguous and its reshape
        # is a view, not a copy of the [B, heads, N, N] bias (400 MB per global block of ViT-B in bf16)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh).contiguous()  # [B*heads, H, W, k_h]
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw).contiguous()  # [B*heads, H, W, k_w]
        bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(b, heads, h * w, h * w)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    out = out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return attn.proj(out)


def _rel_pos_tables(attn: Any, h: int, w: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``get_rel_pos`` for the height and width axes of an ``h`` x ``w`` token grid: ``[h, h, C_head]``,
    ``[w, w, C_head]`` in the weights' dtype."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    return get_rel_pos(h, h, attn.rel_pos_h), get_rel_pos(w, w, attn.rel_pos_w)


def use_sdpa(image_encoder: Any) -> int:
    """Make every attention block of a segment-anything ``ImageEncoderViT`` run through SDPA (in place).

    Call it after the weights have their final dtype and device: the relative-position tables are computed
    from them once, for the token grid the encoder's input size gives (``img_size / patch`` for global blocks,
    the window size for windowed ones).

    Returns:
        The number of attention modules changed.
    """
    import types

    import torch
    from segment_anything.modeling.image_encoder import Attention

    grid = image_encoder.img_size // image_encoder.patch_embed.proj.kernel_size[0]
    changed = 0
    with torch.inference_mode(False), torch.no_grad():
        for block in image_encoder.blocks:
            attn = block.attn
            if not isinstance(attn, Attention):
                continue
            size = block.window_size or grid
            if attn.use_rel_pos:
                attn._ovseg_rel_pos = _rel_pos_tables(attn, size, size)
            attn.forward = types.MethodType(_sdpa_forward, attn)
            changed += 1
    return changed
