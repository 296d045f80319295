"""The ``inspect`` command: quality figures of a run and its HTML report (:mod:`ovseg_mine.inspect`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ovseg_mine.cli.common import fail, warn


def inspect_command(
    run: str = typer.Argument(..., help="Run folder (manifest.json + shards/): a path or an s3:// gs:// file:// URI."),
    gt: Optional[Path] = typer.Option(
        None, "--gt", help="COCO instances (or panoptic) JSON of the same images: adds agreement with ground truth."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON (stdout) instead of text."),
    report: Optional[str] = typer.Option(None, "--report", help="Report folder, a path or a URI (default RUN/report)."),
    no_report: bool = typer.Option(False, "--no-report", help="Only print the figures; write no HTML report."),
    gallery: int = typer.Option(48, "--gallery", min=0, help="Pairs shown in the report's gallery."),
    seed: int = typer.Option(0, "--seed", help="Seed of the gallery's sampling (same seed, same pairs)."),
    skip_damaged: bool = typer.Option(
        False,
        "--skip-damaged",
        help="Leave out shards whose sha256 differs from their done marker (or that lack one, or whose file is "
        "gone), listed in the summary, instead of refusing the run.",
    ),
) -> None:
    """Quality figures of a run: counts, score distributions, nouns, duplicates, ground-truth agreement; HTML report."""
    import json

    from ovseg_mine.inspect.quality import InspectError, format_summary, inspect_run

    try:
        insp = inspect_run(run, gt, skip_damaged=skip_damaged)
        path = None
        if not no_report:
            from ovseg_mine.inspect.report import write_report

            path = write_report(insp, report or insp.run_dir.join("report"), gallery=gallery, seed=seed)
    except InspectError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write the report: {exc}")
    if as_json:  # the text summary lists them itself
        for damaged in insp.figures["damaged_shards"]:
            warn(f"skipped damaged shard {damaged['file']}: {damaged['reason']}")
    typer.echo(json.dumps(insp.figures, indent=2, sort_keys=True) if as_json else format_summary(insp.figures))
    if path is not None:
        typer.echo(f"report: {path}", err=as_json)
