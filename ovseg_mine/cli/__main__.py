"""``python -m ovseg_mine.cli``: the same as the ``ovseg-mine`` console script."""

from ovseg_mine.cli import app

app()
