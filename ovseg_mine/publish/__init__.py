"""``ovseg-mine publish``: a run as a Hugging Face Hub Parquet dataset (:mod:`~ovseg_mine.publish.hub`) with its
dataset card (:mod:`~ovseg_mine.publish.card`)."""
