"""Two-stage open-vocabulary semantic segmentation (``evaluate --task semseg``) and the scoring of prediction files
(``evaluate --predictions DIR``).

The two-stage framework OVSeg builds on (zsseg; Liang et al., CVPR 2023, Sec. 3.1): class-agnostic mask
proposals, each classified by CLIP as a masked crop, then OVSeg's ``semantic_inference``
(``open_vocab_seg/ovseg_model.py``): the per-pixel score of class c is the sum over proposals of the proposal's
class probability (softmax of 100 x cosine over the K class names) times its mask, and each pixel takes the argmax.
Proposals here are binary masks (SAM's or given ones), so a mask's probability is 1 on the mask and 0 elsewhere.
A pixel that no proposal covers has no score: it is predicted as *no class* and counts as wrong
(:mod:`ovseg_mine.evaluate.metrics`). OVSeg's MaskFormer proposals cover every pixel with a soft mask; SAM's do
not, so the share of such pixels is reported (``no_class_pixels``).

Proposals: ``sam`` runs the mining engine's SAM (:class:`ovseg_mine.mine.algorithms.engine.MiningEngine`, the automatic
mask generator of the recipe's ``sam`` section, batched over images); ``coco:JSON`` takes the COCO instance or
panoptic masks of each image (crowd regions left out), ``sa1b:DIR`` SA-1B's per-image JSON, both matched to the
benchmark's images by file name (stem) and filtered as ``mine`` filters given masks (``sam.max_masks_per_image``,
score thresholds where the masks have scores).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ovseg_mine.evaluate.dataset import Sample, SemSegData
from ovseg_mine.evaluate.labels import LabelError, from_train_ids, read_label_map, to_train_ids, write_label_map
from ovseg_mine.evaluate.metrics import ConfusionMatrix
from ovseg_mine.evaluate.weights import LOGIT_SCALE, Classifier


class ProposalError(ValueError):
    """A ``--proposals`` value that cannot be used; the message says why, in one line."""


def semantic_inference(probs: Any, masks: Any, *, max_elements: int = 2**24) -> Any:
    """Per-pixel class from proposal class probabilities and binary masks (OVSeg's ``semantic_inference``).

    Args:
        probs: float ``[Q, K]`` class probabilities per proposal.
        masks: bool ``[Q, H, W]`` proposal masks, same device.
        max_elements: bound on ``(K + Q) * pixels`` handled at a time (memory).

    Returns:
        int64 ``[H, W]``: the argmax over K of ``sum_q probs[q] * masks[q]`` (ties: the lowest class), K where no
        proposal covers the pixel.
    """
    import torch

    q, k = probs.shape
    h, w = masks.shape[1:]
    out = torch.full((h * w,), k, dtype=torch.int64, device=masks.device)
    if q == 0:
        return out.view(h, w)
    flat = masks.reshape(q, -1)
    step = max(1, max_elements // (k + q))
    for start in range(0, h * w, step):
        part = flat[:, start : start + step]
        scores = probs.float().T @ part.float()  # [K, n]
        best = scores.argmax(dim=0)
        out[start : start + step] = torch.where(part.any(dim=0), best, k)
    return out.view(h, w)


class Proposals:
    """Class-agnostic masks for benchmark images (see the module docstring).

    Args:
        spec: ``sam``, ``coco:JSON`` or ``sa1b:DIR``.
        cfg: a mining config (:func:`ovseg_mine.config.build_config`): its ``sam`` section.
        clip, tokenizer: any open_clip model (the mining engine needs one; it is not used for proposals).
        device: where masks are made.

    Raises:
        ProposalError: an unknown kind, a missing file or folder, a JSON that is not COCO annotations.
        WeightsLoadError: SAM's weights cannot be loaded.
    """

    def __init__(self, spec: str, cfg: Any, clip: Any, tokenizer: Any, device: Any) -> None:
        import torch

        from ovseg_mine.mine.sources.proposal_files import SourceError, build_proposal_source, parse_proposals

        self.cfg, self.device = cfg, torch.device(device)
        try:
            self.kind, location = parse_proposals(spec)
        except SourceError as exc:
            raise ProposalError(str(exc)) from exc
        self.engine, self.coco, self.sa1b = None, None, None
        if self.kind == "sam":
            self.engine = self._engine(clip, tokenizer)
        elif self.kind == "coco":
            from ovseg_mine.groundtruth import GroundTruth, GroundTruthError

            try:
                self.coco = GroundTruth(location)
            except GroundTruthError as exc:
                raise ProposalError(f"--proposals coco: {exc}") from exc
            self.coco_ids = {Path(im["file_name"]).stem: i for i, im in self.coco.images.items()}
        else:
            if not Path(location).is_dir():
                raise ProposalError(f"--proposals sa1b:{location}: not a folder")
            self.sa1b = build_proposal_source("sa1b", location)

    def _engine(self, clip: Any, tokenizer: Any) -> Any:
        from ovseg_mine.evaluate.weights import WeightsLoadError
        from ovseg_mine.mine.algorithms.engine import MiningEngine
        from ovseg_mine.models import load_sam
        from ovseg_mine.weights_info import WeightsError

        sam_cfg = self.cfg.sam
        try:
            sam, self.sam_weights = load_sam(
                sam_cfg.model_type,
                sam_cfg.checkpoint,
                device=self.device,
                seed=self.cfg.seed,
                allow_random=self.cfg.allow_random_weights,
            )
        except WeightsError as exc:
            raise WeightsLoadError(str(exc)) from exc
        return MiningEngine(self.cfg, sam, clip, tokenizer, self.device)

    def describe(self) -> dict[str, Any]:
        """JSON-able: the kind, and SAM's settings and weights or the given masks' file."""
        if self.engine is not None:
            return {"kind": "sam", "sam": self.cfg.sam.model_dump(), "weights": self.sam_weights.to_dict()}
        where = str(self.coco.path) if self.coco is not None else self.sa1b.location
        return {"kind": self.kind, "location": where}

    def _given(self, sample: Sample) -> list[dict[str, Any]] | str:
        if self.coco is not None:
            image_id = self.coco_ids.get(sample.stem)
            if image_id is None:
                return f"no image named {sample.stem}.* in {self.coco.path.name}"
            anns = [a for a in self.coco.annotations(image_id) if not a.get("iscrowd")]
            rles = self.coco.rles(image_id, anns)
            return [{"segmentation": r, "bbox": None, "predicted_iou": None, "stability_score": None} for r in rles]
        return self.sa1b.lookup([0], [sample.image_path.name])[0]

    def masks(self, samples: Sequence[Sample], images: Sequence[Any]) -> list[Any | str]:
        """Per sample, bool ``[Q, H, W]`` proposal masks on the device (non-empty ones, best first), or the reason
        it has none (given masks only: no entry for the image, masks of another size).

        Args:
            samples: the images' samples (stems, sizes).
            images: their uint8 ``[3, H, W]`` pixels on the device.
        """
        import torch

        from ovseg_mine.groundtruth import GroundTruthError
        from ovseg_mine.mine.algorithms.engine import ImageJob
        from ovseg_mine.mine.algorithms.given_proposals import GivenMaskError, given_mask_set

        out: list[Any | str] = []
        if self.engine is not None:
            with torch.inference_mode():
                sam_inputs = [self.engine.to_device(self.engine.resize_for_sam(s.image)) for s in samples]
                features = self.engine.sam.embed(sam_inputs)
                for j, (image, sam_image) in enumerate(zip(images, sam_inputs, strict=True)):
                    job = ImageJob(j, image, sam_image, [])
                    # the engine's proposal step (SAM decode + AMG selection), as mining runs it per image
                    sets = self.engine.propose(job, features[j : j + 1])
                    out.append(self._dense(sets))
            return out
        for sample in samples:
            try:
                entries = self._given(sample)
            except GroundTruthError as exc:
                raise ProposalError(str(exc)) from exc
            if isinstance(entries, str):
                out.append(entries)
                continue
            try:
                sets = given_mask_set(
                    entries, sample.gt.shape, self.cfg.sam, self.device, self.cfg.ray.chunk_mib * 2**20
                )
            except GivenMaskError as exc:
                out.append(str(exc))
                continue
            out.append(self._dense(sets))
        return out

    def _dense(self, sets: Any) -> Any:
        import torch

        index = torch.nonzero(sets.valid).flatten()
        return sets.masks(index) if len(index) else torch.zeros((0, *sets.size), dtype=torch.bool, device=self.device)


def segment(
    data: SemSegData,
    classifiers: Sequence[Classifier],
    proposals: Proposals,
    *,
    device: Any = "cpu",
    batch_size: int = 64,
    images_per_batch: int = 1,
    save_predictions: str | os.PathLike[str] | None = None,
    on_image: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Two-stage inference and its confusion matrices over the benchmark.

    Args:
        data: the benchmark.
        classifiers: the CLIPs that classify the proposals (each sees the same proposals).
        proposals: where the masks come from.
        device: where masks, crops and scores live.
        batch_size: crops per image-encoder call; images_per_batch: images per proposal and CLIP batch.
        save_predictions: write each classifier's prediction of each image here, in the ground truth's label
            space (:func:`~ovseg_mine.evaluate.labels.from_train_ids`), named as its label map with ``.png``; with
            several classifiers, in a subfolder per classifier name.
        on_image: called after each image (progress).

    Returns:
        ``{"matrices": {name: ConfusionMatrix}, "no_proposals": [{"file", "reason"}], "proposals_per_image":
        float}``.
    """
    import torch

    names, k = list(data.classes.names), len(data.classes)
    texts = {c.name: c.text(names) for c in classifiers}
    matrices = {c.name: ConfusionMatrix(k) for c in classifiers}
    outdirs = _prediction_folders(save_predictions, classifiers)
    no_proposals: list[dict[str, str]] = []
    counts: list[int] = []

    def flush(group: list[Sample]) -> None:
        images = [torch.from_numpy(s.image).permute(2, 0, 1).to(device) for s in group]
        dense = _proposal_masks(proposals, group, images, no_proposals, device=device)
        counts.extend(int(m.shape[0]) for m in dense)
        for clf in classifiers:
            feats = clf.encode_many(list(zip(images, dense, strict=True)), batch_size=batch_size)
            for sample, f, m in zip(group, feats, dense, strict=True):
                probs = torch.softmax(LOGIT_SCALE * f @ texts[clf.name].T, dim=-1)
                pred = semantic_inference(probs, m).cpu().numpy()
                matrices[clf.name].update(pred, sample.gt)
                if clf.name in outdirs:
                    raw = from_train_ids(
                        pred, k, ignore_label=data.ignore_label, reduce_zero_label=data.reduce_zero_label
                    )
                    write_label_map(outdirs[clf.name] / (sample.label_path.stem + ".png"), raw)

    group: list[Sample] = []
    for sample in data.samples():
        group.append(sample)
        if len(group) >= images_per_batch:
            flush(group)
            group = []
        if on_image is not None:
            on_image()
    if group:
        flush(group)
    return {
        "matrices": matrices,
        "no_proposals": no_proposals,
        "proposals_per_image": round(float(np.mean(counts)), 2) if counts else None,
    }


def _prediction_folders(
    save_predictions: str | os.PathLike[str] | None, classifiers: Sequence[Classifier]
) -> dict[str, Path]:
    """Each classifier's folder for its predictions, created (a subfolder per name with several); {} for none."""
    outdirs = {}
    if save_predictions is not None:
        for c in classifiers:
            outdirs[c.name] = Path(save_predictions) / (c.name if len(classifiers) > 1 else "")
            outdirs[c.name].mkdir(parents=True, exist_ok=True)
    return outdirs


def _proposal_masks(
    proposals: Proposals, group: list[Sample], images: list[Any], no_proposals: list[dict[str, str]], *, device: Any
) -> list[Any]:
    """Each image's bool ``[Q, H, W]`` proposal masks (Q = 0 for none); appends to ``no_proposals`` why for those."""
    import torch

    masks = proposals.masks(group, images)
    for sample, m in zip(group, masks, strict=True):
        if isinstance(m, str):
            no_proposals.append({"file": sample.label_path.name, "reason": m})
        elif not len(m):
            no_proposals.append({"file": sample.label_path.name, "reason": "no proposal"})
    return [
        m if not isinstance(m, str) else torch.zeros((0, *s.gt.shape), dtype=torch.bool, device=device)
        for s, m in zip(group, masks, strict=True)
    ]


def score_predictions(
    data: SemSegData, predictions: str | os.PathLike[str], *, on_image: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Score prediction label maps that any model wrote, no model loaded.

    A prediction is ``DIR/STEM.png`` (or ``.tif``) for the label map ``STEM``, in the ground truth's label space
    (read with the same ``ignore_label`` and ``reduce_zero_label``; its ignore value means no class, a miss).

    Returns:
        ``{"matrices": {"predictions": ConfusionMatrix}, "missing": [{"file", "reason"}]}``: label maps without a
        prediction, or whose prediction has another size, are listed and left out.

    Raises:
        LabelError: the folder is missing, no label map has a prediction, or a prediction value is outside the
            classes (file and value named).
    """
    folder = Path(predictions)
    if not folder.is_dir():
        raise LabelError(f"prediction folder {folder} not found")
    k = len(data.classes)
    matrix, missing, scored = ConfusionMatrix(k), [], 0
    for sample in data.samples(with_images=False):
        found = [folder / f"{sample.stem}{ext}" for ext in (".png", ".tif", ".tiff")]
        path = next((p for p in found if p.is_file()), None)
        if path is None:
            missing.append({"file": sample.label_path.name, "reason": f"no prediction {sample.stem}.png in {folder}"})
            continue
        pred = to_train_ids(
            read_label_map(path),
            k,
            ignore_label=data.ignore_label,
            reduce_zero_label=data.reduce_zero_label,
            path=str(path),
        )
        if pred.shape != sample.gt.shape:
            missing.append(
                {
                    "file": sample.label_path.name,
                    "reason": f"prediction {path.name} is {pred.shape[1]}x{pred.shape[0]}, "
                    f"label map {sample.gt.shape[1]}x{sample.gt.shape[0]}",
                }
            )
            continue
        matrix.update(pred, sample.gt)
        scored += 1
        if on_image is not None:
            on_image()
    if not scored:
        raise LabelError(f"no label map has a prediction in {folder} ({len(missing)} missing)")
    return {"matrices": {"predictions": matrix}, "missing": missing}
