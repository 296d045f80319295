"""A mining run: the driver and the run folder's bookkeeping (resume, locks, commits, manifest, retry).

* :mod:`~ovseg_mine.mine.run.driver` -- :func:`~ovseg_mine.mine.run.driver.mine`, the driver: plans the shards,
  streams the Ray graph's results, commits each shard as it completes, restarts the graph after a lost node, and
  writes the manifest.
* :mod:`~ovseg_mine.mine.run.run_folder` -- the run folder: its config check (resume) and its log.
* :mod:`~ovseg_mine.mine.run.run_lock` -- one run per folder (a lock with the holder's host and pid).
* :mod:`~ovseg_mine.mine.run.inflight` -- results of the shards in flight, until each is complete.
* :mod:`~ovseg_mine.mine.run.failures` -- failed images' tracebacks, counts, and a stop when one error repeats.
* :mod:`~ovseg_mine.mine.run.node_watch` -- a stall after a lost node turned into an exception in the driver.
* :mod:`~ovseg_mine.mine.run.manifest` -- the run's manifest, built from the done shards.
* :mod:`~ovseg_mine.mine.run.retry` -- ``--retry-failed``: shards with failed images mined again.
"""
