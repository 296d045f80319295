"""The run folder of a mining run: its config check and its log.

Layout (see :mod:`ovseg_mine.shards`): ``config.json`` (resolved config and hash, written when a run starts),
``manifest.json``, ``mine.log``, ``shards/``. The folder is a local path or a URI (``s3://``, ``gs://``...;
:mod:`ovseg_mine.storage`). A folder that holds a run of another config is refused, not mixed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ovseg_mine.config import MineConfig, config_hash
from ovseg_mine.mine.errors import RunError
from ovseg_mine.shards import write_json_atomic
from ovseg_mine.storage import Location, StorageError

#: The run's log file (in the run folder): warnings, the traceback of every image that failed, Ray's own log
#: lines (unless ``--verbose`` shows them on the console).
RUN_LOG = "mine.log"


@contextlib.contextmanager
def run_log(run: Location) -> Iterator[logging.Handler]:
    """Append the ``ovseg_mine`` logger's records (INFO and above, with timestamps) to ``RUN/mine.log`` while the
    block runs; the console keeps its own handlers (warnings only).

    On an object store (no appends) the log is kept in a local temporary file, which starts as a copy of the
    run's earlier log and is uploaded to ``RUN/mine.log`` when the block ends (however it ends, short of a kill).

    Yields:
        The file handler, for other loggers to write to the same log (Ray's: :mod:`ovseg_mine.ray_session`).
    """
    target = run.join(RUN_LOG)
    if run.is_local:
        path = Path(target.path)
    else:
        fd, name = tempfile.mkstemp(prefix="ovseg-mine-", suffix=".log")
        path = Path(name)
        with os.fdopen(fd, "wb") as spool, contextlib.suppress(StorageError):
            spool.write(target.read_bytes())
    logger = logging.getLogger("ovseg_mine")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        for other in [logger, *logging.root.manager.loggerDict.values()]:  # and wherever else it was attached
            if isinstance(other, logging.Logger):
                other.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
        if not run.is_local:
            try:
                target.write_bytes(path.read_bytes())
            except StorageError as exc:
                logger.warning("the run's log could not be uploaded to %s (%s); it stays in %s", target, exc, path)
            else:
                path.unlink()


def prepare_run_dir(out: Location, cfg: MineConfig, overwrite: bool) -> None:
    """Create the run folder, or check that it holds a run of the same config.

    Raises:
        RunError: the folder holds a run with another config and ``overwrite`` is False, or it cannot be
            read or written (the message names it).
    """
    cfg_path = out.join("config.json")
    digest = config_hash(cfg)
    try:
        if cfg_path.is_file() and not overwrite:
            try:
                previous = json.loads(cfg_path.read_bytes()).get("config_hash")
            except (ValueError, AttributeError):
                previous = None
            if previous != digest:
                raise RunError(
                    f"{out} holds a run with another config (config_hash {str(previous)[:12]} vs {digest[:12]}); "
                    "use another --out, or --overwrite to discard it"
                )
        if overwrite:
            out.join("done").delete_tree()  # markers first: a stop in between leaves shards without markers
            out.join("shards").delete_tree()
            for name in ("manifest.json", "config.json"):
                out.join(name).delete()
        out.makedirs()
        write_json_atomic(cfg_path, {"config_hash": digest, "config": cfg.model_dump(mode="json")})
    except StorageError as exc:
        raise RunError(str(exc)) from exc
