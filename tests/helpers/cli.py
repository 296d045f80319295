"""The real CLI in a subprocess, its output, and the processes a test starts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: int = 900, failpoints: str | None = None) -> subprocess.CompletedProcess:
    """Run ``ovseg-mine ARGS`` in a subprocess (real CLI, real local Ray); returns the completed process.

    ``failpoints``: the ``OVSEG_MINE_FAILPOINTS`` of the run (ovseg_mine.faults); None: none, whatever the
    test process has."""
    env = {k: v for k, v in os.environ.items() if k != "OVSEG_MINE_FAILPOINTS"}
    if failpoints:
        env["OVSEG_MINE_FAILPOINTS"] = failpoints
    return subprocess.run(
        [sys.executable, "-m", "ovseg_mine.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def kill_processes(processes: list) -> None:
    """SIGKILL these ``psutil.Process``es (those already gone are skipped) and wait until they are gone."""
    import psutil

    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=30)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: How every line the CLI prints itself begins (its progress bar, summaries, notes, one-line errors, and the
#: ``LEVEL: message`` lines of its logging set-up).
CLI_LINE_PREFIXES = (
    "mining ",
    "complete:",
    "partial:",
    "note:",
    "shards and manifest:",
    "stopped by SIGINT:",
    "stopped by SIGTERM:",
    "error:",
    "warning:",
    "WARNING:",
    "ERROR:",
    "report:",
    "dry run:",
    "published:",
)


def assert_only_cli_lines(output: str) -> None:
    """Every non-empty line of ``output`` is one of the CLI's own (no line from Ray or another library)."""
    foreign = [line for line in output.splitlines() if line.strip() and not line.startswith(CLI_LINE_PREFIXES)]
    assert not foreign, "lines not from the CLI:\n" + "\n".join(foreign[:20])
