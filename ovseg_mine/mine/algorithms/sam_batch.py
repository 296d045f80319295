"""SAM's two networks on batches: the image encoder over several images at once, the mask decoder over large
batches of point prompts, with what does not depend on the image computed once.

The steps and their order follow segment-anything's ``SamPredictor`` and ``SamAutomaticMaskGenerator``
(``predictor.py`` ``set_image`` / ``predict_torch``, ``automatic_mask_generator.py`` ``_process_batch``): the input
is the image resized so its longest side is the encoder's input size (``ResizeLongestSide.apply_image``, done by
the decode stage on a CPU), normalised and zero-padded to a square; the prompts are the AMG's point grid in pixels
of the original image, mapped into the resized frame, one positive point each, three masks per point.

What changes, and why it keeps the result:

* **Encoder batches of a fixed size.** Images are encoded ``encoder_batch_size`` at a time and a short batch is
  padded with zero images, so every image goes through kernels of the same shape whatever batch the pipeline
  handed over: its features do not depend on its neighbours (the determinism contract).
* **Prompt embeddings cached per image size.** The sparse point embeddings depend only on the original image
  size (the grid is scaled to it), and are computed with slices instead of the prompt encoder's bool-mask
  assignments (no host sync on a new size; bit-identical, tested); the dense "no mask" embedding and the dense
  positional encoding (``get_dense_pe``) depend on nothing: computed once, not per point batch.
* **Low precision** (``pure_bf16`` / ``pure_fp16``): encoder weights in that dtype, its attention through SDPA
  (:mod:`ovseg_mine.mine.algorithms.sam_attention`); decoder weights in that dtype on a GPU (its cost is memory traffic,
  which bf16 weights halve), autocast to it on a CPU (where bf16 element-wise ops are slower than float32 ones:
  measured 104 s vs 36 s for 128 prompts with bf16 weights vs float32 on this project's 2-core CPU, autocast
  about as fast as float32); the decoder's IoU head in float32 either way (a bf16 IoU head gives about 30
  distinct predicted IoUs above 0.88, so the NMS order and the top-N cap would be decided by ties). In ``fp32``
  SAM's code and kernels run unchanged. (A bf16 recipe runs in fp32 on a CPU without bf16 hardware:
  :func:`ovseg_mine.precision.for_inference`.)
* **Fused decoder** (``kernels="fused"``, :mod:`ovseg_mine.mine.algorithms.sam_decoder`): the same masks up to float
  rounding with about a third of the bytes moved per prompt; it runs in the decoder's dtype like the stock one
  (bfloat16 weights on a GPU; on a CPU with a ``pure_*`` precision, float32 weights under the same autocast) with
  its IoU head in float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

    from ovseg_mine.config import SamConfig
    from ovseg_mine.mine.algorithms.amg import MaskSet
    from ovseg_mine.mine.algorithms.compiled import CompiledParts


class BatchedSam:
    """A segment-anything ``Sam`` prepared for batched mining.

    Args:
        sam: a segment-anything ``Sam`` (any ``image_encoder.img_size``); its weights are cast in place for
            ``pure_*`` precisions.
        points_per_side: the AMG's grid is ``points_per_side`` x ``points_per_side`` points.
        points_per_batch: point prompts per mask-decoder call (3 masks each).
        precision: ``fp32``, ``pure_bf16`` or ``pure_fp16`` (:mod:`ovseg_mine.precision`).
        encoder_batch_size: images per image-encoder call (short batches are padded to it).
        low_precision_decoder: with a ``pure_*`` precision, cast the decoder's weights too (None: on CUDA only;
            a CPU runs the decoder under autocast, see the module docstring).
        compile: ``engine.compile``'s mode for the encoder and the decoder step (any device), or the engine's
            :class:`~ovseg_mine.mine.algorithms.compiled.CompiledParts` to add them to. Compiled, each image's
            last prompt batch is padded to the others' size (:mod:`~ovseg_mine.mine.algorithms.compiled`).
        kernels: ``stock``: segment-anything's ``MaskDecoder`` (proposals identical to its AMG); ``fused``:
            :class:`~ovseg_mine.mine.algorithms.sam_decoder.FusedDecoder` (far fewer bytes per prompt, equal up to
            float rounding), in the same dtype (bfloat16 weights on a GPU, autocast on a CPU: see the module
            docstring) with the IoU head in float32.

    Raises:
        ValueError: unknown precision, compile mode or kernels, or a size below 1.
    """

    def __init__(
        self,
        sam: Any,
        *,
        points_per_side: int,
        points_per_batch: int,
        precision: str = "fp32",
        encoder_batch_size: int = 1,
        low_precision_decoder: bool | None = None,
        compile: "str | CompiledParts" = "off",
        kernels: str = "stock",
    ) -> None:
        import torch
        from segment_anything.utils.amg import build_point_grid
        from segment_anything.utils.transforms import ResizeLongestSide

        from ovseg_mine import precision as precision_mod
        from ovseg_mine.mine.algorithms.compiled import CompiledParts
        from ovseg_mine.mine.algorithms.sam_attention import use_sdpa
        from ovseg_mine.mine.algorithms.sam_decoder import FusedDecoder

        if precision not in ("fp32", "pure_bf16", "pure_fp16"):
            raise ValueError(f"precision must be one of fp32, pure_bf16, pure_fp16, got {precision!r}")
        if kernels not in ("stock", "fused"):
            raise ValueError(f"kernels must be stock or fused, got {kernels!r}")
        if min(points_per_side, points_per_batch, encoder_batch_size) < 1:
            raise ValueError("points_per_side, points_per_batch and encoder_batch_size must be at least 1")
        self.sam = sam
        self.device = next(sam.parameters()).device
        self.precision = precision
        self.dtype = precision_mod.dtype_of(precision)
        self.points_per_batch = points_per_batch
        self.encoder_batch_size = encoder_batch_size
        self.img_size = int(sam.image_encoder.img_size)
        self.mask_threshold = float(sam.mask_threshold)
        self.transform = ResizeLongestSide(self.img_size)
        self.point_grid = build_point_grid(points_per_side)  # [P*P, 2] xy in [0, 1]
        self.decoder_precision = "fp32"
        self.decoder_dtype = torch.float32
        if precision_mod.is_pure(precision):
            sam.image_encoder.to(self.dtype)
            use_sdpa(sam.image_encoder)
            if low_precision_decoder is None:
                low_precision_decoder = self.device.type == "cuda"
            if low_precision_decoder:
                sam.mask_decoder.to(self.dtype)
                self.decoder_dtype = self.dtype
            else:
                self.decoder_precision = precision.replace("pure_", "amp_")
            _float32_iou_head(sam.mask_decoder, self.device)
        with torch.inference_mode():
            self._dense_pe = sam.prompt_encoder.get_dense_pe().to(self.decoder_dtype)  # [1, C, h, w]
            emb = sam.prompt_encoder.image_embedding_size
            self._no_mask = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *emb)
            self._no_mask = self._no_mask.to(self.decoder_dtype)
        self._sparse: dict[tuple[int, int], torch.Tensor] = {}
        self.parts = compile if isinstance(compile, CompiledParts) else CompiledParts(compile, self.device)
        self._encoder = self.parts.wrap("sam_encoder", sam.image_encoder)
        self.kernels = kernels
        self._fused = FusedDecoder(sam) if kernels == "fused" else None
        self._step = self.parts.wrap("sam_decoder", self._stock_step if self._fused is None else self._fused.step)
        # compiled: every decoder call takes the same number of prompts (one graph; the padding's outputs dropped)
        self._prompt_batch = min(points_per_batch, len(self.point_grid)) if self.parts.mode != "off" else None

    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """``(h, w)`` of the encoder input (before padding) for an original image of ``size`` ``(H, W)``."""
        return tuple(self.transform.get_preprocess_shape(size[0], size[1], self.img_size))  # type: ignore[return-value]

    def resize(self, image: np.ndarray) -> np.ndarray:
        """SAM's resize of an ``[H, W, 3]`` uint8 RGB image to the encoder's input size (longest side), uint8
        ``[h, w, 3]``: ``ResizeLongestSide.apply_image`` (PIL, bilinear), run on a CPU by the decode stage."""
        return self.transform.apply_image(image)

    def embed(self, images: Sequence["torch.Tensor"]) -> "torch.Tensor":
        """Image embeddings of resized images.

        Args:
            images: uint8 ``[3, h, w]`` tensors on the model's device, each resized by :meth:`resize`
                (longest side = the encoder's input size).

        Returns:
            ``[len(images), C, h', w']`` in the model's dtype (``C, h', w'`` = 256, 64, 64 for the published SAMs).
        """
        import torch
        import torch.nn.functional as F

        sam, size, batch = self.sam, self.img_size, self.encoder_batch_size
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), batch):
                chunk = images[start : start + batch]
                x = torch.zeros((batch, 3, size, size), dtype=torch.float32, device=self.device)
                for i, image in enumerate(chunk):  # preprocess as Sam.preprocess: normalise, pad right/bottom
                    h, w = image.shape[-2:]
                    x[i] = F.pad((image[None] - sam.pixel_mean) / sam.pixel_std, (0, size - w, 0, size - h))[0]
                out.append(self._encoder(x.to(self.dtype))[: len(chunk)])
        return torch.cat(out)

    def _sparse_prompts(self, size: tuple[int, int]) -> "torch.Tensor":
        """Sparse embeddings ``[P, 2, C]`` of the grid's points for an original image of ``size`` (cached per size).

        The same numbers as ``PromptEncoder(points=(coords, ones), boxes=None)``, computed without its
        bool-mask assignments (``_embed_points``: four host syncs on a GPU per new size): a positive point is its
        positional encoding plus ``point_embeddings[1]``, and the padding point (label -1) is
        ``not_a_point_embed`` alone."""
        import torch

        if size not in self._sparse:
            encoder = self.sam.prompt_encoder
            points = self.point_grid * np.array([size[1], size[0]])  # xy pixels of the original image
            coords = torch.as_tensor(self.transform.apply_coords(points, size), device=self.device)[:, None, :]
            with torch.inference_mode():
                # as _embed_points: shift to the pixel centre, append a (0, 0) padding point, encode
                padded = torch.cat([coords + 0.5, torch.zeros((len(points), 1, 2), device=self.device)], dim=1)
                sparse = encoder.pe_layer.forward_with_coords(padded, encoder.input_image_size)
                sparse[:, 0] += encoder.point_embeddings[1].weight[0]
                sparse[:, 1] = encoder.not_a_point_embed.weight[0]
            if len(self._sparse) >= 64:  # many distinct sizes (non-COCO data): keep the cache small
                self._sparse.clear()
            self._sparse[size] = sparse.to(self.decoder_dtype)
        return self._sparse[size]

    def decode(self, features: "torch.Tensor", size: tuple[int, int]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Masks of every grid point of one image, as the AMG's ``predict_torch(multimask_output=True)``.

        Args:
            features: ``[1, C, h', w']`` image embedding (a row of :meth:`embed`).
            size: original image size ``(H, W)`` in pixels.

        Returns:
            Low-resolution mask logits ``[3P, 4h', 4w']`` in the decoder's output dtype (point-major, three masks per
            point, as the AMG flattens them) and predicted IoUs float32 ``[3P]``; no host sync.
        """
        import torch

        from ovseg_mine.precision import autocast

        sparse = self._sparse_prompts(size)
        features = features.to(self.decoder_dtype)
        if self._fused is not None:
            return self._decode_fused(features, sparse)
        lows, ious = [], []
        with torch.inference_mode(), autocast(self.decoder_precision, self.device):
            for start in range(0, len(sparse), self.points_per_batch):
                prompts = sparse[start : start + self.points_per_batch]
                count, pad = len(prompts), (self._prompt_batch or 0) - len(prompts)
                if pad > 0:
                    prompts = torch.cat([prompts, prompts.new_zeros((pad, *prompts.shape[1:]))])
                low, iou = self._step(features, prompts)
                lows.append(low[:count])
                ious.append(iou[:count])
        low, iou = torch.cat(lows), torch.cat(ious)
        return low.flatten(0, 1), iou.flatten(0, 1).float()

    def _stock_step(self, features: "torch.Tensor", prompts: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        """One decoder call: segment-anything's ``MaskDecoder`` (``multimask_output=True``) on ``[B, 2, C]`` sparse
        prompts and one image's ``[1, C, h', w']`` features; returns logits ``[B, 3, 4h', 4w']`` and IoUs
        ``[B, 3]``. The part compiled as ``sam_decoder``."""
        return self.sam.mask_decoder(
            image_embeddings=features,
            image_pe=self._dense_pe,
            sparse_prompt_embeddings=prompts,
            dense_prompt_embeddings=self._no_mask.expand(len(prompts), -1, -1, -1),
            multimask_output=True,
        )

    def _decode_fused(self, features: "torch.Tensor", sparse: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        """:meth:`decode` with :class:`~ovseg_mine.mine.algorithms.sam_decoder.FusedDecoder`: its per-image context
        once, then its ``step`` per batch of ``points_per_batch`` prompts (compiled: the last batch padded to that
        size), each writing its logits into its slice of the result."""
        import torch

        from ovseg_mine.precision import autocast

        fused, ious, batch = self._fused, [], self._prompt_batch
        count = len(sparse)
        if batch:  # compiled: whole batches only (one graph); the padding's outputs are dropped
            sparse = torch.cat([sparse, sparse.new_zeros((-count % batch, *sparse.shape[1:]))])
        dtype = self.dtype if self.decoder_precision.startswith("amp_") else self.decoder_dtype  # the step's output
        grid = 4 * np.array(fused.grid)
        with torch.inference_mode(), autocast(self.decoder_precision, self.device):
            low = torch.empty((len(sparse), fused.num_mask_tokens - 1, *grid), dtype=dtype, device=self.device)
            context = fused.context(features)
            for start in range(0, len(sparse), self.points_per_batch):
                end = start + self.points_per_batch  # written in place: no concatenation of the batches' logits
                if batch:  # a compiled step returns its own outputs (CUDA graphs do not write into inputs)
                    step_low, iou = self._step(context, sparse[start:end])
                    low[start:end] = step_low
                else:
                    iou = self._step(context, sparse[start:end], out=low[start:end])[1]
                ious.append(iou)
        return low[:count].flatten(0, 1), torch.cat(ious)[:count].flatten(0, 1)

    def upsampler(self, size: tuple[int, int]) -> "Callable[[torch.Tensor], torch.Tensor]":
        """segment-anything's ``Sam.postprocess_masks`` for an original image of ``size`` ``(H, W)``: low-resolution
        logits ``[k, h, w]`` float32 -> full-resolution logits ``[k, H, W]`` (bilinear to the encoder's input size,
        the padding cropped, bilinear to ``size``)."""
        input_size, postprocess = self.input_size(size), self.sam.postprocess_masks
        return lambda low: postprocess(low[:, None], input_size, size)[:, 0]

    def propose(self, features: "torch.Tensor", size: tuple[int, int], cfg: "SamConfig", chunk_bytes: int) -> "MaskSet":
        """SAM's kept proposals of one image: :meth:`decode` over the point grid, then the automatic mask
        generator's selection (:func:`ovseg_mine.mine.algorithms.amg.select_masks`), on the device. The one
        proposal step of mining (:meth:`~ovseg_mine.mine.algorithms.engine.MiningEngine.propose`) and of the
        single-image API (:class:`~ovseg_mine.mine.algorithms.proposals.SamMaskGenerator`).

        Args:
            features: ``[1, C, h', w']`` image embedding (a row of :meth:`embed`).
            size: original image size ``(H, W)`` in pixels.
            cfg: the selection's thresholds, ``max_masks_per_image`` and ``min_mask_region_area``.
            chunk_bytes: memory given to full-resolution masks at a time (sets the set's ``chunk``).

        Returns:
            The image's :class:`~ovseg_mine.mine.algorithms.amg.MaskSet`, best first.
        """
        from ovseg_mine.mine.algorithms.amg import chunk_size, select_masks

        low_res, iou = self.decode(features, size)
        return select_masks(
            low_res,
            iou,
            cfg=cfg,
            size=size,
            upsample=self.upsampler(size),
            mask_threshold=self.mask_threshold,
            chunk=chunk_size(size, self.img_size, chunk_bytes),
            min_region_area=cfg.min_mask_region_area,
        )


def _float32_iou_head(decoder: Any, device: "torch.device") -> None:
    """Run the mask decoder's IoU head in float32, whatever the decoder's weights or autocast: its input is
    cast to float32 and autocast is off inside it."""
    import torch

    head = decoder.iou_prediction_head.float()
    forward = head.forward

    def float32_forward(x: "torch.Tensor") -> "torch.Tensor":
        with torch.autocast(device.type, enabled=False):
            return forward(x.float())

    head.forward = float32_forward
