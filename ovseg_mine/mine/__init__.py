"""``ovseg-mine mine``: image-caption data in, mask-noun pair shards out. Four layers, each a subpackage:

* :mod:`~ovseg_mine.mine.sources` -- where images and captions come from (coco, hf, webdataset, img2dataset,
  folder) behind a registry, and the masks a user already has (COCO, SA-1B): a shard plan of light tasks in the
  driver, one record per image inside Ray.
* :mod:`~ovseg_mine.mine.algorithms` -- the mining itself, on one device: caption screening, nouns (spaCy), SAM's
  proposals, masked crops scored against the nouns by CLIP, each noun's best mask
  (:class:`~ovseg_mine.mine.algorithms.engine.MiningEngine`).
* :mod:`~ovseg_mine.mine.graph` -- the Ray graph: the algorithms as Ray Data stages (noun actors, decode tasks,
  one mask/match actor per GPU, finalize tasks), the rows between them, the plan that sizes them.
* :mod:`~ovseg_mine.mine.run` -- the run: the driver (:func:`~ovseg_mine.mine.run.driver.mine`), which commits
  each shard as it completes, and the run folder's bookkeeping (resume, lock, manifest, failures, retry).

Each layer imports only those listed before it, the shared modules of :mod:`ovseg_mine` and
:mod:`~ovseg_mine.mine.errors` (``RunError``); the command line (:mod:`ovseg_mine.cli.mine`) calls the driver.
"""
