"""``python -m ovseg_mine.cli``: the same as the ``ovseg-mine`` console script."""

from ovseg_mine.cli import app

if __name__ == "__main__":  # not when a spawned worker process imports this module as ``__mp_main__``
    app()
