"""``ovseg-mine publish``: a run as a Hugging Face Hub Parquet dataset, and a finetune as an open_clip model repo.

* :mod:`~ovseg_mine.publish.hub` -- the dataset folder (checked shards, manifest, card) and its upload.
* :mod:`~ovseg_mine.publish.parquet` -- the Hub's Parquet files of the pairs (a viewer-friendly table per shard).
* :mod:`~ovseg_mine.publish.card` -- the dataset card (a jinja2 template, ``card.md``).
* :mod:`~ovseg_mine.publish.model` -- a finetune in open_clip's model layout with a model card (``model_card.md``).
"""
