"""BASELINE, not ovseg-mine: the mining loop a user would write by hand, the way OVSeg-style code does it.

For each image: ``SamAutomaticMaskGenerator.generate`` (stock segment-anything, fp32), the same proposal rule
as ovseg-mine (drop empty masks, best ``max_masks_per_image`` by predicted IoU), then for each mask a PIL
crop of its tight box, the background filled with CLIP's mean pixel, a bicubic resize to the CLIP input size
(``F.interpolate``, as OVSeg resizes its region tensors) and one ``encode_image`` call per crop; each noun's
text embedding is computed again for every image (14 ViLD prompts averaged); each noun takes the argmax mask.
Same models, weights and parameters as ovseg-mine, so that the two run side by side on the same images
(``benchmarks/mine_benchmark.py``). Nothing in the library imports this module.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ovseg_mine import rle
from ovseg_mine.config import MineConfig
from ovseg_mine.crops import CLIP_MEAN_PIXEL
from ovseg_mine.mine.algorithms.nouns import extract_nouns
from ovseg_mine.text import VILD_TEMPLATES


class ReferenceMiner:
    """The baseline miner; ``mine(record)`` returns the image's pairs, its proposals and per-stage seconds.

    Args:
        cfg: the same :class:`MineConfig` ovseg-mine runs with (``sam``, ``clip.batch_size`` is ignored: one
            crop per call; ``clip.precision`` is ignored: fp32, as the stock code runs).
        sam, clip, tokenizer: the models (the same weights ovseg-mine loads).
        nlp: the spaCy pipeline of :func:`ovseg_mine.mine.algorithms.nouns.load_nlp`; None: take ``record["nouns"]``.
        input_size, mean, std: CLIP input side (pixels) and its per-channel normalization in [0, 1].
    """

    def __init__(
        self, cfg: MineConfig, sam: Any, clip: Any, tokenizer: Any, nlp: Any, input_size: int, mean: tuple, std: tuple
    ) -> None:
        from segment_anything import SamAutomaticMaskGenerator

        self.cfg, self.clip, self.tokenizer, self.nlp = cfg, clip, tokenizer, nlp
        self.device = next(clip.parameters()).device
        self.amg = SamAutomaticMaskGenerator(
            sam,
            points_per_side=cfg.sam.points_per_side,
            points_per_batch=cfg.sam.points_per_batch or 64,  # the stock default
            pred_iou_thresh=cfg.sam.pred_iou_thresh,
            stability_score_thresh=cfg.sam.stability_score_thresh,
            box_nms_thresh=cfg.sam.box_nms_thresh,
            min_mask_region_area=cfg.sam.min_mask_region_area,
            output_mode="binary_mask",
        )
        self.size = input_size
        self.mean = torch.tensor(mean, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(3, 1, 1)

    def mine(self, record: dict[str, Any], out_file: Any) -> tuple[list[dict], np.ndarray, dict[str, float]]:
        """Mine one image; write its pairs as one JSON line to ``out_file``.

        Returns:
            pairs (``noun``, ``mask_index``, ``similarity``, ``margin``, ``mask`` RLE), the proposals'
            bool masks ``[N, H, W]``, and seconds per stage (nouns, decode, proposals, crops, clip, write).
        """
        t: dict[str, float] = {}
        start = time.perf_counter()
        if self.nlp is None:  # nouns given with the record (machines without spaCy: the GPU check)
            nouns = list(record["nouns"])
        else:
            nouns = [n.text for n in extract_nouns(self.nlp, [record["captions"]])[0]]
        t["nouns"] = time.perf_counter() - start

        start = time.perf_counter()
        pil = Image.open(record["path"]).convert("RGB")
        image = np.asarray(pil)
        t["decode"] = time.perf_counter() - start

        start = time.perf_counter()
        with torch.no_grad():
            records = self.amg.generate(image)
        records = [r for r in records if r["area"] > 0]
        records.sort(key=lambda r: -r["predicted_iou"])  # stable: ties keep the AMG's order
        records = records[: self.cfg.sam.max_masks_per_image]
        masks = np.stack([r["segmentation"] for r in records]) if records else np.zeros((0,) + image.shape[:2], bool)
        t["proposals"] = time.perf_counter() - start

        # One crop, one encode, one mask at a time.
        start_crops, crops_s, feats = time.perf_counter(), 0.0, []
        fill = np.asarray(CLIP_MEAN_PIXEL, dtype=np.float32)
        for mask in masks:
            c0 = time.perf_counter()
            ys, xs = np.nonzero(mask)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            region = np.asarray(pil.crop(box), dtype=np.float32)
            keep = np.asarray(Image.fromarray(mask).crop(box))
            region = np.where(keep[..., None], region, fill)
            crop = torch.from_numpy(region).permute(2, 0, 1)[None].to(self.device)
            crop = F.interpolate(crop, size=(self.size, self.size), mode="bicubic", align_corners=False)
            crop = (crop / 255.0 - self.mean) / self.std
            crops_s += time.perf_counter() - c0
            with torch.no_grad():
                f = self.clip.encode_image(crop).float()[0]
            feats.append(f / f.norm())
        t["crops"] = crops_s
        t["clip"] = time.perf_counter() - start_crops - crops_s

        start = time.perf_counter()
        pairs = []
        if feats and nouns:
            image_emb = torch.stack(feats)
            text_emb = []
            with torch.no_grad():
                for noun in nouns:
                    tokens = self.tokenizer([tpl.format(noun) for tpl in VILD_TEMPLATES]).to(self.device)
                    e = self.clip.encode_text(tokens).float()
                    e = (e / e.norm(dim=-1, keepdim=True)).mean(0)
                    text_emb.append(e / e.norm())
            sims = (torch.stack(text_emb) @ image_emb.T).cpu()
            for k, noun in enumerate(nouns):
                best = int(sims[k].argmax())
                others = torch.cat([sims[k, :best], sims[k, best + 1 :]])
                margin = float(sims[k, best] - others.max()) if len(others) else None
                pairs.append(
                    {
                        "noun": noun,
                        "mask_index": best,
                        "similarity": float(sims[k, best]),
                        "margin": margin,
                        "mask": rle.encode(masks[best]),
                    }
                )
        t["clip"] += time.perf_counter() - start

        start = time.perf_counter()
        out_file.write(json.dumps({"image_id": record["image_id"], "pairs": pairs}) + "\n")
        t["write"] = time.perf_counter() - start
        return pairs, masks, t
