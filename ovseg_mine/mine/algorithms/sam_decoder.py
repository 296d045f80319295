"""SAM's mask decoder for one image and a batch of point prompts, rewritten to move far fewer bytes per prompt.

It computes what segment-anything's ``MaskDecoder.predict_masks`` with its ``TwoWayTransformer``
(``modeling/mask_decoder.py``, ``modeling/transformer.py``: ``TwoWayAttentionBlock``, ``Attention``,
``final_attn_token_to_image``, ``output_upscaling``, ``output_hypernetworks_mlps``, ``iou_prediction_head``)
computes for ``multimask_output=True``, equal up to float rounding, with these changes of order (exact in real
arithmetic):

* **Per image, once** (:meth:`FusedDecoder.context`): the dense input (image embedding + the "no mask" embedding;
  no ``repeat_interleave`` per prompt), the first layer's token->image keys and values and its image->token
  queries; the batched products broadcast them instead of copying them per prompt. The first token->image
  attention, whose keys and values are the image's, is one ``scaled_dot_product_attention`` over all the prompts'
  tokens (a fused kernel: no attention matrix written). The dense positional encoding
  depends on nothing: prepared at construction.
* **Heads without reshuffles.** Heads are laid out along the rows: a token's per-head vectors are rows ``(t, h)``,
  so the large attention matrices come out in the layout the next product reads. Where a per-head product meets a
  token-side projection, the two are folded at construction into one ``C x C`` block per head (head-row weights
  ``[H*C, C]``: one ``linear`` of the tokens gives all heads' rows, e.g. ``W_k,h^T (W_q,h x + b_q,h)``); with the
  image's own queries (the first layer) the per-head product is a dense one against a block-diagonal operand built
  on the small token side. The value and output projections are folded into one matrix per head
  (``out_proj(attn @ v_proj(x)) = sum_h attn_h @ x @ (W_o,h W_v,h)^T + W_o b_v + b_o``, attention rows summing
  to 1). Where the keys are per prompt the key projection is folded into the queries
  (``q_h . W_k,h (x + pe) = (W_k,h^T q_h) . x + (W_k,h^T q_h) . pe``; the ``q_h . b_k,h`` term is constant
  along the softmax and dropped), so ``keys + key_pe`` is never written. The softmax scale is folded into the
  query weights.
* **Token->image attention on per-prompt keys** (the later layers' and the final one): one single-head
  ``scaled_dot_product_attention`` per prompt, queries the rows ``(t, h)`` (``C`` wide), keys and values both the
  ``[N, C]`` keys (one tensor), the positional term ``(W_k,h^T q_h) . pe`` its additive mask: the keys read
  once, no attention matrix written. Image->token attention on per-prompt keys: one ``baddbmm`` whose added term
  is the positional term, a softmax over each head's tokens, and the residual as ``baddbmm_`` into the keys.
* **Only what the multimask output reads**: the final token->image attention for the IoU token and mask tokens
  ``1..`` only, the hypernetwork product for those masks only.
* **Upscaling on channels-last tokens**: each ``ConvTranspose2d(kernel 2, stride 2)`` is one ``addmm`` (weights
  reshaped once), ``LayerNorm2d`` one ``layer_norm`` over the last dimension, each exact GELU one ``gelu`` that
  reads its input through a permuted view and writes it in the pixel order the next product needs, so the
  hypernetwork product (one ``bmm`` whose output is only the masks) writes the masks in their final layout, into
  the caller's ``out``: no ``[32, 4h, 4w]`` channels-first tensor, no permuting copy.
* The token MLPs' ReLU runs in the first layer's product (``_addmm_activation``: exact, not an approximation).
* The IoU head runs in float32 whatever the decoder's dtype (as :mod:`ovseg_mine.mine.algorithms.sam_batch`).

Bytes moved per prompt (SAM vit_b, bf16, 1,024 prompts, ``python benchmarks/decoder_bytes.py``; the byte rule with
an op's mutated-and-read tensor counted twice): 59.9 MB against segment-anything's 181.7 MB. Where they go (MB):
upscaling and masks 31.9 (GELUs 12.6, the two transposed convolutions 10.5, ``layer_norm`` 4.2, the hypernetwork
``bmm`` 4.6: reads the ``[16*N, 32]`` upscaled tokens once); the later layers' image->token attention with its
residual and ``norm4`` 13.3 (the ``[N, C]`` keys read three times, written twice); the first layer's 8.2
(keys written twice, read once); the later layers' token->image attention 3.1 and the final one 2.7 (keys read
once, mask written and read); the token side (self-attention, MLPs, norms, IoU head) 0.8.

:meth:`FusedDecoder.step` is a pure tensor function of fixed shapes (no host sync, no branch on values), so it
compiles with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DecoderContext(NamedTuple):
    """The prompt-independent part of one image's decoding (:meth:`FusedDecoder.context`), in the decoder's dtype.

    ``N = h*w`` image tokens, ``C`` channels, ``I`` the first layer's cross-attention width:

    * ``src``: ``[N, C]`` image embedding + "no mask" embedding (the first layer's residual).
    * ``keys``: ``[1, H, N, d]`` the first token->image attention's keys of ``src + pe``, per head (``d = I/H``).
    * ``values``: ``[1, H, N, d]`` its values of ``src``, per head.
    * ``queries``: ``[N, I]`` the first image->token attention's queries of ``src + pe`` (softmax scale folded in).
    """

    src: Tensor
    keys: Tensor
    values: Tensor
    queries: Tensor


def _heads(attn: Any) -> tuple[int, int]:
    """``(heads, channels per head)`` of a segment-anything ``Attention``."""
    return attn.num_heads, attn.internal_dim // attn.num_heads


def _block_diagonal(x: Tensor, heads: int) -> Tensor:
    """``[B, T, H*d]`` -> ``[B, T*H, H*d]``: row ``(t, h)`` is ``x[b, t]`` with every channel outside head ``h``
    zeroed (a product with it is the per-head product, heads laid out along the rows)."""
    b, t, width = x.shape
    eye = torch.eye(heads, dtype=x.dtype, device=x.device)
    return (x.view(b, t, 1, heads, width // heads) * eye.view(1, 1, heads, heads, 1)).view(b, t * heads, width)


def _activate_contiguous(act: nn.Module, x: Tensor) -> Tensor:
    """``act(x)`` as a new contiguous tensor of ``x``'s shape (``x`` may be a permuted view): eagerly, for an exact
    ``nn.GELU``, one ``gelu`` with ``out=`` a fresh contiguous tensor (strided reads, no copy after). (Not the
    other way round: torch 2.14's CPU ``gelu`` with a strided ``out=`` leaves it unwritten.) Under
    ``torch.compile`` the plain form (its functionalization gives an ``out=`` result the input's strides; the
    compiler fuses the layout change into the GELU's kernel itself)."""
    if isinstance(act, nn.GELU) and act.approximate == "none" and not torch.compiler.is_compiling():
        return torch.ops.aten.gelu.out(x, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
    return act(x).contiguous()


def _mlp(mlp: Any, x: Tensor) -> Tensor:
    """segment-anything's ``MLPBlock`` (``lin2(act(lin1(x)))``) on ``x [B, T, C]``; with a ReLU, the first layer
    and the ReLU as one ``_addmm_activation`` (the activation in the product's epilogue: its input not written)."""
    if not isinstance(mlp.act, nn.ReLU):
        return mlp(x)
    weight = mlp.lin1.weight
    hidden = torch._addmm_activation(mlp.lin1.bias, x.reshape(-1, x.shape[-1]).to(weight.dtype), weight.T)
    return F.linear(hidden, mlp.lin2.weight, mlp.lin2.bias).view(*x.shape[:-1], -1)


class _Folded(NamedTuple):
    """One ``Attention``'s weights folded (float32 until cast). Head-row weights ``[H*C, C]`` give, by one
    ``linear`` of the tokens ``[B, T, C]``, an output ``[B, T, H*C]`` that is ``[B, T*H, C]`` with rows ``(t, h)``:
    each head's product folded into one ``C x C`` block (no block-diagonal operand, no second product)."""

    wq: Tensor  # [I, C] query weight times the softmax scale
    bq: Tensor  # [I]
    wk: Tensor  # [I, C]
    bk: Tensor  # [I]
    wv: Tensor  # [I, C]
    bv: Tensor  # [I]
    wo_heads: Tensor  # [H, d, C]: out_proj's columns of head h, as [d, C]
    bo: Tensor  # [C]
    wov: Tensor  # [H*C, C]: row block h = (W_o,h W_v,h)^T
    bov: Tensor  # [C]: W_o b_v + b_o
    qk: tuple[Tensor, Tensor]  # head rows: W_k,h^T (W_q,h x + b_q,h), a token query with the key projection in
    kq: tuple[Tensor, Tensor]  # head rows: W_q,h^T (W_k,h x + b_k,h), a token key with the query projection in
    kb: tuple[Tensor, Tensor]  # [H, C], [H]: b_q,h . (W_k,h x + b_k,h), the query bias's term of a token key
    vo: tuple[Tensor, Tensor]  # head rows: W_o,h (W_v,h x + b_v,h) + b_o / H, a token value with out_proj in


def _head_rows(w_out: Tensor, w_in: Tensor, b_in: Tensor) -> tuple[Tensor, Tensor]:
    """``x -> W_out,h^T (W_in,h x + b_in,h)`` per head as one ``linear``: weight ``[H*C, C]``, bias ``[H*C]``
    (``w_out, w_in``: ``[H, d, C]``, ``b_in``: ``[H, d]``)."""
    heads, _, c = w_out.shape
    weight = torch.einsum("hdo,hdi->hoi", w_out, w_in).reshape(heads * c, -1)
    return weight, torch.einsum("hdo,hd->ho", w_out, b_in).reshape(-1)


def _fold(attn: Any, dtype: torch.dtype) -> _Folded:
    """Fold a segment-anything ``Attention``'s projections (see the module docstring), cast to ``dtype``."""
    heads, d = _heads(attn)
    scale = d**-0.5
    wq, bq = attn.q_proj.weight.float() * scale, attn.q_proj.bias.float() * scale
    wk, bk = attn.k_proj.weight.float(), attn.k_proj.bias.float()
    wv, bv = attn.v_proj.weight.float(), attn.v_proj.bias.float()
    wo, bo = attn.out_proj.weight.float(), attn.out_proj.bias.float()
    c = wo.shape[0]
    wo_heads = wo.view(c, heads, d).permute(1, 2, 0)  # [H, d, C]
    wov = torch.einsum("hdi,hdo->hio", wv.view(heads, d, -1), wo_heads).reshape(heads * wv.shape[1], c)
    split = lambda w: w.reshape(heads, d, -1)  # noqa: E731  [I, C] -> [H, d, C]; [I] -> [H, d, 1]
    qk = _head_rows(split(wk), split(wq), split(bq)[..., 0])
    kq = _head_rows(split(wq), split(wk), split(bk)[..., 0])
    kb = torch.einsum("hdc,hd->hc", split(wk), split(bq)[..., 0]), (split(bq) * split(bk))[..., 0].sum(-1)
    vw, vb = _head_rows(wo_heads, split(wv), split(bv)[..., 0])
    vo = vw, vb + (bo / heads).repeat(heads)
    folded = _Folded(wq, bq, wk, bk, wv, bv, wo_heads, bo, wov, wo @ bv + bo, qk, kq, kb, vo)
    cast = lambda t: t.to(dtype).contiguous()  # noqa: E731
    return _Folded(*(tuple(map(cast, t)) if isinstance(t, tuple) else cast(t) for t in folded))


class FusedDecoder(nn.Module):
    """A segment-anything ``Sam``'s mask decoder for one image and a batch of point prompts, multimask output only,
    moving far fewer bytes per prompt than ``MaskDecoder`` (module docstring); equal to
    ``MaskDecoder(..., multimask_output=True)`` up to float rounding.

    Args:
        sam: a segment-anything ``Sam`` (only its ``mask_decoder`` and ``prompt_encoder`` are read), on the device
            it will run on. Its ``mask_decoder``'s dtype (that of ``mask_tokens``) is the dtype this decoder runs
            in (cast the decoder first, e.g. to bfloat16; float32 weights under ``torch.autocast`` also work, as
            ``BatchedSam`` runs them on a CPU); the IoU head runs in float32 either way, autocast off. The
            transformer's modules are shared, not copied; the other weights are folded into new tensors at
            construction (change the ``Sam``'s weights afterwards and this decoder does not follow).

    Raises:
        ValueError: an ``output_upscaling`` other than two ``ConvTranspose2d(kernel_size=2, stride=2)``, a
            decoder with fewer than two mask tokens, or sigmoid outputs on its MLPs (not in segment-anything's
            SAM).
    """

    def __init__(self, sam: Any) -> None:
        super().__init__()
        decoder, encoder = sam.mask_decoder, sam.prompt_encoder
        transformer = decoder.transformer
        dtype = decoder.mask_tokens.weight.dtype
        conv1, norm, act1, conv2, act2 = decoder.output_upscaling
        for conv in (conv1, conv2):
            if tuple(conv.kernel_size) != (2, 2) or tuple(conv.stride) != (2, 2) or tuple(conv.padding) != (0, 0):
                raise ValueError(f"FusedDecoder needs ConvTranspose2d(kernel_size=2, stride=2), got {conv}")
        if decoder.num_mask_tokens < 2:
            raise ValueError("FusedDecoder needs a multimask decoder (at least two mask tokens)")
        if any(m.sigmoid_output for m in [*decoder.output_hypernetworks_mlps, decoder.iou_prediction_head]):
            raise ValueError("FusedDecoder does not support MLPs with sigmoid_output")
        self.dtype, self.num_mask_tokens = dtype, decoder.num_mask_tokens
        self.layers, self.norm_final = transformer.layers, transformer.norm_final_attn
        self.act1, self.act2, self.up_norm_eps = act1, act2, norm.eps
        self.grid = tuple(encoder.image_embedding_size)
        device_type = decoder.mask_tokens.weight.device.type  # autocast is turned off for the IoU head on it
        self.autocast_type = device_type if torch.amp.is_autocast_available(device_type) else None  # None: meta
        self.heads, self.head_dim = _heads(transformer.layers[0].cross_attn_token_to_image)
        with torch.no_grad():
            pe = encoder.get_dense_pe()[0].flatten(1).to(dtype)  # [C, N]
            self.pe_t, self.pe = pe.contiguous(), pe.T.contiguous()
            self.no_mask = encoder.no_mask_embed.weight[0].to(dtype)
            self.tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight]).to(dtype)  # [1+M, C]
            self.to_image = [_fold(layer.cross_attn_token_to_image, dtype) for layer in transformer.layers]
            self.to_tokens = [_fold(layer.cross_attn_image_to_token, dtype) for layer in transformer.layers]
            self.final = _fold(transformer.final_attn_token_to_image, dtype)
            channels = conv1.in_channels
            self.up1 = (
                conv1.bias.repeat(4).to(dtype),
                conv1.weight.permute(0, 2, 3, 1).reshape(channels, -1).to(dtype),
            )
            self.up_norm = (norm.weight.to(dtype), norm.bias.to(dtype))
            self.up2 = (
                conv2.bias.repeat(4).to(dtype),
                conv2.weight.permute(0, 2, 3, 1).reshape(conv1.out_channels, -1).to(dtype),
            )
            mlps = decoder.output_hypernetworks_mlps[1:]  # the multimask outputs' token MLPs
            self.hyper = [
                (torch.stack([m.layers[j].bias for m in mlps])[:, None].to(dtype),
                 torch.stack([m.layers[j].weight.T for m in mlps]).to(dtype).contiguous())
                for j in range(mlps[0].num_layers)
            ]  # fmt: skip
            self.iou_head = [(lin.weight.detach().float().clone(), lin.bias.detach().float().clone())
                             for lin in decoder.iou_prediction_head.layers]  # fmt: skip

    def context(self, features: Tensor) -> DecoderContext:
        """The prompt-independent part of decoding one image.

        Args:
            features: ``[1, C, h, w]`` image embedding (a row of ``Sam.image_encoder``'s output), any float dtype.

        Returns:
            A :class:`DecoderContext` in the decoder's dtype.

        Raises:
            ValueError: ``features`` is not ``[1, C, h, w]`` with this decoder's ``C, h, w``.
        """
        channels, n = self.pe_t.shape
        if features.dim() != 4 or features.shape[0] != 1 or tuple(features.shape[1:]) != (channels, *self.grid):
            raise ValueError(
                f"features must be [1, {channels}, {self.grid[0]}, {self.grid[1]}], got {tuple(features.shape)}"
            )
        src = features[0].flatten(1).T.to(self.dtype) + self.no_mask  # [N, C]
        src_pe = src + self.pe
        first, back = self.to_image[0], self.to_tokens[0]
        shape = (1, n, self.heads, self.head_dim)
        keys = F.linear(src_pe, first.wk, first.bk).view(shape).transpose(1, 2).contiguous()
        values = F.linear(src, first.wv, first.bv).view(shape).transpose(1, 2).contiguous()
        return DecoderContext(src, keys, values, F.linear(src_pe, back.wq, back.bq))

    def step(self, context: DecoderContext, sparse: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Masks and IoUs of a batch of prompts of one image, as ``MaskDecoder(..., multimask_output=True)``.

        A pure tensor function of fixed shapes (no host sync, no branch on values): compiles with
        ``torch.compile(fullgraph=True)``.

        Args:
            context: the image's :meth:`context`.
            sparse: ``[B, S, C]`` sparse prompt embeddings (``PromptEncoder``'s first output; ``S = 2`` for one
                point and its padding point).
            out: where to write the mask logits (``[B, M-1, 4h, 4w]``, contiguous; e.g. a slice of all the image's
                prompts' logits, which spares a concatenation); None: a new tensor.

        Returns:
            Low-resolution mask logits ``[B, M-1, 4h, 4w]`` in the decoder's dtype (``M-1 = 3`` multimask outputs;
            ``out`` when given) and their predicted IoUs, float32 ``[B, M-1]``.
        """
        b = sparse.shape[0]
        tokens = torch.cat([self.tokens.expand(b, -1, -1), sparse.to(self.dtype)], dim=1)  # [B, T, C]
        layer = self.layers[0]  # segment-anything's TwoWayAttentionBlock with skip_first_layer_pe
        queries = layer.norm1(layer.self_attn(q=tokens, k=tokens, v=tokens))
        queries = layer.norm2(queries + self._to_shared_image(context, queries + tokens))
        queries = layer.norm3(queries + _mlp(layer.mlp, queries))
        keys = layer.norm4(self._to_tokens_shared(context, queries, tokens))
        for i in range(1, len(self.layers)):
            layer = self.layers[i]
            q = queries + tokens
            queries = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
            queries = layer.norm2(queries + self._to_image(self.to_image[i], queries + tokens, keys))
            queries = layer.norm3(queries + _mlp(layer.mlp, queries))
            keys = layer.norm4(self._to_tokens(self.to_tokens[i], keys, queries, tokens))
        m = self.num_mask_tokens
        kept = torch.cat([queries[:, :1], queries[:, 2 : m + 1]], dim=1)  # IoU token, multimask tokens
        kept_pe = torch.cat([tokens[:, :1], tokens[:, 2 : m + 1]], dim=1)
        kept = self.norm_final(kept + self._to_image(self.final, kept + kept_pe, keys))
        return self._masks(keys, kept[:, 1:], out), self._iou(kept[:, 0])[:, 1:]

    def _to_shared_image(self, context: DecoderContext, q_in: Tensor) -> Tensor:
        """The first layer's token->image attention ``[B, T, C]`` on the image's shared keys and values: one
        ``scaled_dot_product_attention`` with the prompts' tokens as the queries of one batch (a fused kernel on a
        GPU and on a CPU writes no attention matrix)."""
        b, t, _ = q_in.shape
        fold = self.to_image[0]
        q = F.linear(q_in, fold.wq, fold.bq).view(1, b * t, self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, context.keys, context.values, scale=1.0)  # scale is in wq
        return torch.addmm(
            fold.bo, out.transpose(1, 2).reshape(b * t, -1), fold.wo_heads.view(-1, fold.bo.shape[0])
        ).view(b, t, -1)

    def _to_tokens_shared(self, context: DecoderContext, queries: Tensor, tokens: Tensor) -> Tensor:
        """The first layer's image->token attention added to the image's keys: ``[B, N, C]`` before ``norm4``."""
        b, t, _ = queries.shape
        fold, n = self.to_tokens[0], context.queries.shape[0]
        k = _block_diagonal(F.linear(queries + tokens, fold.wk, fold.bk), self.heads)  # rows (t, h)
        logits = torch.mm(context.queries, k.view(b * t * self.heads, -1).T)  # [N, (b, t, h)]
        attn = logits.view(n, b, t, self.heads).softmax(2).view(n, b, -1)  # softmax over the tokens of a head
        return torch.baddbmm(context.src, attn.transpose(0, 1), self._values(fold, queries))

    def _values(self, fold: _Folded, queries: Tensor) -> Tensor:
        """Per-prompt values times the output projection, plus ``b_o / H``: ``[B, T*H, C]``, rows ``(t, h)`` (an
        image row's attention sums to 1 per head: ``b_o`` once)."""
        b, t, _ = queries.shape
        return F.linear(queries, *fold.vo).view(b, t * self.heads, -1)

    def _to_image(self, fold: _Folded, q_in: Tensor, keys: Tensor) -> Tensor:
        """Token->image attention ``[B, T, C]`` on per-prompt ``keys [B, N, C]``: one single-head
        ``scaled_dot_product_attention`` per prompt whose queries are the rows ``(t, h)`` with the key projection
        folded in (``W_k,h^T q_h``, ``C`` wide), whose keys and values are both ``keys`` (one tensor: a fused
        kernel reads it once) and whose additive mask is the positional term ``(W_k,h^T q_h) . pe``; the value and
        output projections are one matrix per head applied after."""
        b, t, _ = q_in.shape
        channels = keys.shape[-1]
        qk = F.linear(q_in, *fold.qk).view(b * t * self.heads, channels)  # [(b, t, h), C]
        pe_term = torch.mm(qk, self.pe_t).view(b, 1, t * self.heads, -1)
        kv = keys.unsqueeze(1)
        qk = qk.view(b, 1, t * self.heads, channels).to(kv.dtype)
        mixed = F.scaled_dot_product_attention(qk, kv, kv, attn_mask=pe_term.to(kv.dtype), scale=1.0)
        return torch.addmm(fold.bov, mixed.view(b * t, -1), fold.wov).view(b, t, channels)

    def _to_tokens(self, fold: _Folded, keys: Tensor, queries: Tensor, tokens: Tensor) -> Tensor:
        """Image->token attention added to per-prompt ``keys [B, N, C]``: ``[B, N, C]`` before the norm; the
        query projection folded into the tokens' keys, the positional encoding into the product's added term."""
        b, t, _ = queries.shape
        n, channels = keys.shape[1:]
        x = queries + tokens
        kq = F.linear(x, *fold.kq).view(b * t * self.heads, channels)  # [(b, t, h), C]
        pe_term = torch.addmm(F.linear(x, *fold.kb).view(1, -1), self.pe, kq.T).view(n, b, -1).transpose(0, 1)
        logits = torch.baddbmm(pe_term, keys, kq.view(b, -1, channels).transpose(1, 2))  # [B, N, (t, h)]
        attn = logits.view(b, n, t, self.heads).softmax(2).view(b, n, -1)
        values = self._values(fold, queries)
        # in place on keys (a fresh norm's output); .to: a no-op unless autocast gave them other dtypes
        return keys.baddbmm_(attn.to(keys.dtype), values.to(keys.dtype))

    def _masks(self, keys: Tensor, mask_tokens: Tensor, out: Tensor | None) -> Tensor:
        """``output_upscaling`` on channels-last ``keys [B, N, C]`` and the hypernetwork product with
        ``mask_tokens [B, K, C]``: mask logits ``[B, K, 4h, 4w]``.

        Output pixel ``(4y + 2i + k, 4x + 2j + l)`` comes from token ``(y, x)``, the first transposed convolution's
        offset ``(i, j)`` and the second's ``(k, l)``. Each GELU reads its input through a permuted view (strided
        reads in runs of 128 bytes) and writes its result contiguous in the row order the next product needs: the
        first in order ``(y, i, x, j)``, the second ``(y, i, k, x, j, l)``, so the hypernetwork product writes the
        masks in their final layout (into ``out`` when it has the product's dtype): no permuting copy."""
        b, n, channels = keys.shape
        (b1, w1), (b2, w2), (h, w) = self.up1, self.up2, self.grid
        x = torch.addmm(b1, keys.reshape(b * n, channels), w1)  # rows (b, y, x), columns (i, j, c/4)
        x = F.layer_norm(x.view(b * n * 4, -1), (w2.shape[0],), *self.up_norm, self.up_norm_eps)
        up = _activate_contiguous(self.act1, x.view(b, h, w, 2, 2, -1).permute(0, 1, 3, 2, 4, 5))  # (b, y, i, x, j)
        x = torch.addmm(b2, up.view(b * n * 4, -1), w2)  # rows (b, y, i, x, j), columns (k, l, c/8)
        up = _activate_contiguous(self.act2, x.view(b, h, 2, w, 2, 2, 2, -1).permute(0, 1, 2, 5, 3, 4, 6, 7))
        hyper = mask_tokens.transpose(0, 1)  # [K, B, C]
        for j, (bias, weight) in enumerate(self.hyper):
            hyper = torch.baddbmm(bias, hyper, weight)
            hyper = F.relu(hyper) if j < len(self.hyper) - 1 else hyper
        hyper, pixels = hyper.transpose(0, 1), up.view(b, n * 16, -1).transpose(1, 2)  # rows (y, i, k, x, j, l)
        k = hyper.shape[1]
        if out is None:
            return torch.bmm(hyper, pixels).view(b, k, 4 * h, 4 * w)
        if out.dtype == pixels.dtype == hyper.dtype:
            torch.bmm(hyper, pixels, out=out.view(b, k, -1))
        else:  # autocast gave the product another dtype than out's
            out.view(b, k, -1).copy_(torch.bmm(hyper, pixels))
        return out

    def _iou(self, token: Tensor) -> Tensor:
        """``iou_prediction_head`` in float32 (autocast off) on the IoU token ``[B, C]``: ``[B, M]``."""
        off = (
            contextlib.nullcontext()
            if self.autocast_type is None
            else torch.autocast(self.autocast_type, enabled=False)
        )
        with off:
            x = token.float()
            for j, (weight, bias) in enumerate(self.iou_head):
                x = F.linear(x, weight, bias)
                x = F.relu(x) if j < len(self.iou_head) - 1 else x
        return x
