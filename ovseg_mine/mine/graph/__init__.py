"""The Ray graph of mining: the stages as Ray Data callables, the rows between them, the graph that strings them.

* :mod:`~ovseg_mine.mine.graph.dataset` -- the Ray Data graph (read -> nouns -> decode -> mask/match -> finalize)
  and the plan that sizes each stage from the cluster's resources
  (:func:`~ovseg_mine.mine.graph.dataset.stream_results`, :func:`~ovseg_mine.mine.graph.dataset.plan_stages`).
* :mod:`~ovseg_mine.mine.graph.stages` -- the stages: noun actors, decode and finalize tasks, mask/match actors
  (one per GPU) running :class:`~ovseg_mine.mine.algorithms.engine.MiningEngine`.
* :mod:`~ovseg_mine.mine.graph.rows` -- the image's row from the GPU stage to the shard
  (:class:`~ovseg_mine.mine.graph.rows.ImageResult`), the Arrow schemas of the rows between stages derived from it,
  and how a stage makes its output rows (:func:`~ovseg_mine.mine.graph.rows.next_rows`).
* :mod:`~ovseg_mine.mine.graph.weights` -- the weights every actor loads, resolved once by the driver
  (:class:`~ovseg_mine.mine.graph.weights.ResolvedWeights`) and loaded by each actor without resolving or hashing
  them again (:func:`~ovseg_mine.mine.graph.weights.load_models`).
* :mod:`~ovseg_mine.mine.graph.attempts` -- images whose worker died, skipped after ``ray.max_image_attempts``.
"""
