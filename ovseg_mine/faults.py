"""Failpoints: named places where a test can make a real run crash, to prove that it resumes.

A failpoint does nothing unless the environment variable ``OVSEG_MINE_FAILPOINTS`` names it. Its value is a
comma-separated list of ``NAME:KEY=ACTION`` entries, for example::

    OVSEG_MINE_FAILPOINTS="shard.after_rename:1=kill,image:139=kill"

* ``NAME`` is one of :data:`FAILPOINTS`; ``KEY`` selects the instance (a shard index, an image id; ``*``
  matches every one).
* ``ACTION`` is ``kill`` (SIGKILL the current process: what the kernel's OOM killer or a power cut does, no
  ``finally`` runs), ``exit`` (``os._exit(1)``: a hard crash, e.g. a segfault in a native library),
  ``raise`` (a :class:`FailpointError`, an ordinary Python exception) or ``sleep(S)`` (pause S seconds: a
  window in which a test can kill or interrupt the process at a known point, whatever the machine's speed).

The workers of a local Ray inherit the driver's environment, so the same variable reaches the mask/match actors;
on a cluster joined with ``--ray-address`` the driver hands it to the job's workers on every node through Ray's
runtime environment (:func:`worker_env_vars`, ovseg_mine.ray_session). This is the same idea as etcd's gofail or
TiKV's fail-rs, reduced to what ovseg-mine's tests need.
"""

from __future__ import annotations

import os
import re
import signal
import time

ENV = "OVSEG_MINE_FAILPOINTS"

#: Every failpoint in the code base and where it sits.
FAILPOINTS: dict[str, str] = {
    "shard.before_rename": "the shard's .tmp file is written and fsynced, not yet renamed (key: shard index)",
    "shard.after_rename": "the shard file is in place, its done marker done/shard-N.json not yet written (key: index)",
    "shard.after_done": "the shard is committed and marked done (key: shard index)",
    "image": "a mask/match actor starts mining a decoded image (key: image id)",
    "run.after_commit": "the driver has committed a shard and not yet taken the next result (key: shard index)",
    "manifest.before_write": "the run's manifest is built, not yet written (key: run)",
}


_SLEEP = re.compile(r"sleep\((\d+(?:\.\d+)?)\)")


class FailpointError(RuntimeError):
    """Raised by a failpoint whose action is ``raise``."""


def _actions() -> dict[tuple[str, str], str]:
    spec = os.environ.get(ENV, "")
    actions: dict[tuple[str, str], str] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        where, _, action = entry.partition("=")
        name, _, key = where.partition(":")
        if name not in FAILPOINTS or not (action in ("kill", "exit", "raise") or _SLEEP.fullmatch(action)):
            raise ValueError(
                f"{ENV}: bad entry {entry!r}; names {sorted(FAILPOINTS)}, actions kill, exit, raise, sleep(SECONDS)"
            )
        actions[(name, key or "*")] = action
    return actions


def worker_env_vars() -> dict[str, str]:
    """``{OVSEG_MINE_FAILPOINTS: value}`` when the driver has failpoints set, else ``{}``: the ``env_vars`` of the
    runtime environment a joined cluster's workers get."""
    return {ENV: os.environ[ENV]} if os.environ.get(ENV) else {}


def failpoint(name: str, key: object) -> None:
    """Trigger failpoint ``name`` for instance ``key`` if the environment asks for it; else return at once.

    Raises:
        FailpointError: the configured action is ``raise``.
        ValueError: ``OVSEG_MINE_FAILPOINTS`` is malformed.
    """
    if ENV not in os.environ:
        return
    actions = _actions()
    action = actions.get((name, str(key))) or actions.get((name, "*"))
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "exit":
        os._exit(1)
    elif action == "raise":
        raise FailpointError(f"failpoint {name}:{key} triggered")
    elif action is not None:
        # Short naps, not one long sleep: a signal (Ctrl-C) delivered to another thread of this process (Ray's)
        # only sets CPython's flag, which the main thread checks between naps.
        deadline = time.monotonic() + float(_SLEEP.fullmatch(action).group(1))
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.05, left))
