"""Mining's algorithms: plain PyTorch and NumPy on one device, no Ray, no files.


* :mod:`~ovseg_mine.mine.algorithms.nouns` -- nouns of the captions (spaCy noun chunks, lemmas, stop nouns).
* :mod:`~ovseg_mine.mine.algorithms.sam_attention` -- SAM's attention on ``scaled_dot_product_attention``.
* :mod:`~ovseg_mine.mine.algorithms.sam_decoder` -- SAM's mask decoder for one image and a batch of point prompts,
  moving far fewer bytes per prompt (``engine.kernels = "fused"``).
* :mod:`~ovseg_mine.mine.algorithms.sam_batch` -- SAM's encoder and decoder over batches of images and prompts.
* :mod:`~ovseg_mine.mine.algorithms.compiled` -- the GPU stage's parts under ``torch.compile`` (``engine.compile``),
  each a bounded number of fixed-shape graphs, their compiles counted and timed.
* :mod:`~ovseg_mine.mine.algorithms.amg` -- the automatic mask generator's selection (IoU and stability
  thresholds, box NMS) on the device: a :class:`~ovseg_mine.mine.algorithms.amg.MaskSet` per image.
* :mod:`~ovseg_mine.mine.algorithms.fused_amg` -- the same selection for several images at once, upsampling as two
  matrices per image size and fixed-shape chunk bodies (``engine.kernels = "fused"``).
* :mod:`~ovseg_mine.mine.algorithms.proposals` -- class-agnostic mask proposals of one image
  (:class:`~ovseg_mine.mine.algorithms.proposals.SamMaskGenerator`, the single-image API).
* :mod:`~ovseg_mine.mine.algorithms.given_proposals` -- masks the user gave (a record's COCO RLEs) as the proposals,
  with SAM's selection rules, instead of SAM's.
* :mod:`~ovseg_mine.mine.algorithms.matching` -- CLIP embeddings of masked crops and nouns, each noun's best mask.
* :mod:`~ovseg_mine.mine.algorithms.engine` -- :class:`~ovseg_mine.mine.algorithms.engine.MiningEngine`: the GPU
  stage's work on a batch of images (proposals, crops, CLIP, matching) with one host transfer per image.
"""
