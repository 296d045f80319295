"""The ``ovseg-mine`` command line: one module per command, each parsing its options, loading its config and
calling the library. No logic of its own.

* :mod:`~ovseg_mine.cli.mine` -- ``mine``, ``demo``, ``pipelines``;
* :mod:`~ovseg_mine.cli.inspect`, :mod:`~ovseg_mine.cli.publish`, :mod:`~ovseg_mine.cli.finetune`,
  :mod:`~ovseg_mine.cli.evaluate`, :mod:`~ovseg_mine.cli.export` -- one command each;
* :mod:`~ovseg_mine.cli.common` -- what the commands share (errors as one line and an exit code, logging);
* :mod:`~ovseg_mine.cli.__main__` -- ``python -m ovseg_mine.cli``.

Heavy libraries are imported inside the commands, so ``ovseg-mine --help`` stays instant.
"""

from __future__ import annotations

import typer

from ovseg_mine.cli import evaluate, export, finetune, inspect, mine, publish

app = typer.Typer(
    name="ovseg-mine",
    help="Mine mask-noun pairs from image-caption data (COCO Captions) for mask-adapted CLIP (OVSeg).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("mine")(mine.mine_command)
app.command("demo")(mine.demo_command)
app.command("pipelines")(mine.pipelines_command)
app.command("inspect")(inspect.inspect_command)
app.command("publish")(publish.publish_command)
app.command("finetune")(finetune.finetune_command)
app.command("evaluate")(evaluate.evaluate_command)
app.command("export")(export.export_command)


def main() -> None:  # pragma: no cover - console entry point
    """Console entry point of ``ovseg-mine``."""
    app()
