"""The run folder of a mining run: its config check and its log.

Layout (see :mod:`ovseg_mine.shards`): ``config.json`` (resolved config and hash, written when a run starts),
``manifest.json``, ``shards/``. A folder that holds a run of another config is refused, not mixed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from ovseg_mine.config import MineConfig, config_hash
from ovseg_mine.shards import write_json_atomic

#: The run's log file (in the run folder): warnings, and the traceback of every image that failed.
RUN_LOG = "mine.log"


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Append the ``ovseg_mine`` logger's records (INFO and above, with timestamps) to ``path`` while the block
    runs; the console keeps its own handlers (warnings only)."""
    logger = logging.getLogger("ovseg_mine")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


class RunError(RuntimeError):
    """The run folder cannot be used as asked (e.g. it holds a run with another config)."""


def prepare_run_dir(out: Path, cfg: MineConfig, overwrite: bool) -> None:
    """Create the run folder, or check that it holds a run of the same config.

    Raises:
        RunError: the folder holds a run with another config and ``overwrite`` is False.
    """
    cfg_path = out / "config.json"
    digest = config_hash(cfg)
    if cfg_path.is_file() and not overwrite:
        try:
            previous = json.loads(cfg_path.read_text(encoding="utf-8")).get("config_hash")
        except json.JSONDecodeError:
            previous = None
        if previous != digest:
            raise RunError(
                f"{out} holds a run with another config (config_hash {str(previous)[:12]} vs {digest[:12]}); "
                "use another --out, or --overwrite to discard it"
            )
    if overwrite:
        for name in ("shards", "manifest.json", "config.json"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cfg_path, {"config_hash": digest, "config": cfg.model_dump(mode="json")})
