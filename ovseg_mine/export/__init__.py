"""Exports to the tools the field trains with: one module per format.

* :mod:`~ovseg_mine.export.openclip_csv`: masked-crop PNGs + a tab-separated CSV (open_clip_train ``--dataset-type
  csv``, OVSeg's reference training);
* :mod:`~ovseg_mine.export.wds`: webdataset tars + ``sizes.json`` (``--dataset-type webdataset``);
* :mod:`~ovseg_mine.export.checkpoint`: a finetune as an open_clip_train epoch file (OVSeg's
  ``tools/ovseg_replace_clip.py`` takes it).

Shared: :mod:`~ovseg_mine.export.crops` (OVSeg's crop rule), :mod:`~ovseg_mine.export.pairs` (checked shards,
filters), :mod:`~ovseg_mine.export.images` (a run's images), :mod:`~ovseg_mine.export.command` (the trainer command).
"""
