"""Consumers of mined shards: finetune CLIP on mask-noun pairs and evaluate masked-region classification.

Modules, one concept each:

* :mod:`~ovseg_mine.finetune.config` -- the typed training config (pydantic).
* :mod:`~ovseg_mine.finetune.data` -- a streaming PyTorch dataset over Parquet shards (masked crops + masks).
* :mod:`~ovseg_mine.finetune.patch_mask` -- crop masks and the per-patch foreground mask of prompt tuning.
* :mod:`~ovseg_mine.finetune.mask_prompt` -- mask prompt tuning as hooks on an open_clip VisionTransformer.
* :mod:`~ovseg_mine.finetune.loss` -- contrastive loss with same-noun pairs as positives.
* :mod:`~ovseg_mine.finetune.checkpoint` -- open_clip-loadable weights, prompts, metadata, resume state.
* :mod:`~ovseg_mine.finetune.optim` -- AdamW as open_clip_train sets it up, warm-up + cosine schedule.
* :mod:`~ovseg_mine.finetune.stage` -- one training stage (tower, optimizer, data, checkpoints, curve).
* :mod:`~ovseg_mine.finetune.train` -- the whole finetune (one process, or one Ray Train worker), stage by stage.
* :mod:`~ovseg_mine.finetune.distributed` -- the same loop under Ray Train (TorchTrainer, DDP).
* :mod:`~ovseg_mine.finetune.evaluate` -- masked-region classification on ground-truth masks
  (read by :mod:`ovseg_mine.groundtruth`).

The commands are :mod:`ovseg_mine.cli.finetune` and :mod:`ovseg_mine.cli.evaluate`.

Heavy dependencies (torch, open_clip, pyarrow, ray) are imported inside the modules that need them.
"""
