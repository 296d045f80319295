"""``ovseg-mine mine``: image-caption data in, mask-noun pair shards out.

One module per stage, named by the field's term:

* :mod:`~ovseg_mine.mine.sources` -- the image-caption sources (coco, hf, webdataset, img2dataset, folder) behind
  a registry: a shard plan of light tasks, and the read step that produces one record per image inside Ray;
  :mod:`~ovseg_mine.mine.captions` screens captions (empty, non-English, over-long).
* :mod:`~ovseg_mine.mine.nouns` -- nouns of the captions (spaCy).
* :mod:`~ovseg_mine.mine.proposals` -- class-agnostic mask proposals (segment-anything's automatic mask generator);
  :mod:`~ovseg_mine.mine.proposal_sources` and :mod:`~ovseg_mine.mine.given_proposals` -- masks the user already
  has (COCO instances/panoptic, SA-1B JSON) instead.
* :mod:`~ovseg_mine.mine.matching` -- CLIP embeddings of masked crops and nouns, each noun's best mask.
* :mod:`~ovseg_mine.mine.stages` -- the Ray Data stages (callable classes) that run the above;
  :mod:`~ovseg_mine.mine.attempts` tracks images whose worker died.
* :mod:`~ovseg_mine.mine.weights` -- the weights every actor loads, resolved once by the driver.
* :mod:`~ovseg_mine.mine.run_folder` -- the run folder: config check, log.
* :mod:`~ovseg_mine.mine.inflight` -- results of the shards in flight, until each is complete.
* :mod:`~ovseg_mine.mine.graph` -- Ray: start or join it, the streaming graph of stages.
* :mod:`~ovseg_mine.mine.manifest` -- the run manifest built from the done shards.
* :mod:`~ovseg_mine.mine.node_watch` -- the driver's side of the graph: results handed over from a reader thread,
  a stall after a lost node turned into a resumable stop.
* :mod:`~ovseg_mine.mine.pipeline` -- :func:`~ovseg_mine.mine.pipeline.mine`, the driver that ties them together
  (commits shards as they complete; stop signals: :mod:`ovseg_mine.stop_signals`).
"""
