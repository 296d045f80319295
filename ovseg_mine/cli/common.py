"""What every command shares: the one-line error exit, logging set-up and the ``--set`` help text."""

from __future__ import annotations

import logging
from typing import NoReturn

import typer

SET_HELP = (
    "Override a recipe value, e.g. --set sam.points_per_side=16 --set clip.pretrained=/path/ckpt.pt (repeatable)."
)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: MESSAGE`` in red on stderr and exit with ``code`` (2: a usage or input error)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    """Print ``warning: MESSAGE`` in yellow on stderr."""
    typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


def setup_logging() -> None:
    """Library warnings (the ``ovseg_mine`` logger and others) as ``LEVEL: message`` lines on stderr; INFO
    records (which a run also writes to its log file) stay off the console."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)
