"""``ovseg-mine evaluate`` on the paper's semantic-segmentation benchmarks (OVSeg, Liang et al., CVPR 2023, Sec. 4).

- :mod:`~ovseg_mine.evaluate.metrics`: the pixel confusion matrix and detectron2's scores (mIoU, fwIoU, mACC,
  pACC, per-class IoU; mIoU-seen/unseen and hIoU as zsseg).
- :mod:`~ovseg_mine.evaluate.labels`: label maps (uint8/uint16, ignore value, zero reduction) and class lists.
- :mod:`~ovseg_mine.evaluate.benchmarks`: the known folder layouts (ade150, ade847, pc59, pc459, voc20) and the
  pairing of images with label maps; :mod:`~ovseg_mine.evaluate.dataset` reads them image by image.
- :mod:`~ovseg_mine.evaluate.weights`: the weights to score (:func:`~ovseg_mine.evaluate.weights.load_clip`) and the
  masked-region classifier.
- :mod:`~ovseg_mine.evaluate.regions`: ``--task regions``, ground-truth class regions classified as masked crops.
- :mod:`~ovseg_mine.evaluate.semseg`: ``--task semseg``, proposals + CLIP + OVSeg's semantic inference; scoring of
  prediction files.
- :mod:`~ovseg_mine.evaluate.run` runs a request; :mod:`~ovseg_mine.evaluate.report` prints and writes it.

Classification of COCO instance masks (``evaluate --gt``) lives in :mod:`ovseg_mine.finetune.evaluate`.
"""
