"""The ``export`` command: a run's pairs for open_clip_train (``openclip-csv``, ``webdataset``), or a finetune as an
open_clip_train epoch file (``open_clip``). The work is in :mod:`ovseg_mine.export`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ovseg_mine.cli.common import fail, warn

FORMATS = ("openclip-csv", "webdataset", "open_clip")


def export_command(
    source: str = typer.Argument(
        ..., help="A run folder (openclip-csv, webdataset) or a finetune output folder (open_clip): a path or a URI."
    ),
    fmt: str = typer.Option(..., "--format", help="openclip-csv | webdataset | open_clip."),
    out: Path = typer.Option(..., "--out", help="Output folder (openclip-csv, webdataset) or .pt file (open_clip)."),
    template: str = typer.Option("a photo of a {}.", "--template", help="Caption of each crop; {} is the noun."),
    min_similarity: Optional[float] = typer.Option(None, "--min-similarity", help="Keep pairs with similarity >= S."),
    min_margin: Optional[float] = typer.Option(None, "--min-margin", help="Keep pairs with margin >= M."),
    nouns: Optional[Path] = typer.Option(None, "--nouns", help="Keep only the nouns of this file (one per line)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most N pairs (the first in shard order)."),
    images: Optional[str] = typer.Option(None, "--images", help="Image root (default: the run's manifest)."),
) -> None:
    """Export mined pairs for open_clip_train (masked-crop PNGs + CSV, or webdataset tars), or a finetune as an
    open_clip_train epoch file that OVSeg's tools/ovseg_replace_clip.py takes."""
    from ovseg_mine.export.pairs import ExportError, PairFilter, read_nouns

    if fmt not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    try:
        if fmt == "open_clip":
            from ovseg_mine.export.checkpoint import export_open_clip

            done = export_open_clip(source, out)
            prompts = f", mask prompts {done['mask_embedding']}" if done["mask_embedding"] else ""
            typer.echo(f"wrote {done['out']}: {done['arch']}, {done['keys']} tensors{prompts}")
            typer.echo(f"open_clip_train: --model {done['arch']} --pretrained {done['out']}")
            return
        filt = PairFilter(min_similarity, min_margin, read_nouns(nouns) if nouns else None, limit)
        result = _export_pairs(fmt, source, str(out), template, filt, images)
    except ExportError as exc:
        fail(str(exc))
    if result.unfinished:
        warn(
            f"{len(result.unfinished)} shard(s) without a done marker left out (unfinished run), e.g. "
            f"{result.unfinished[0]}"
        )
    if result.skipped:
        warn(
            f"{len(result.skipped)} pair(s) skipped (listed in {result.out}/export.json), e.g. "
            f"{result.skipped[0]['file_name']}: {result.skipped[0]['reason']}"
        )
    typer.echo(f"exported {result.pairs} pairs ({result.written} written now) to {result.out}")
    typer.echo("train with open_clip_train:")
    typer.echo(f"  {result.command}")


def _export_pairs(fmt, source, out, template, filt, images):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ovseg_mine.export.openclip_csv import export_csv
    from ovseg_mine.export.wds import export_webdataset

    progress = Progress(TextColumn("export"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
    task = progress.add_task("export", total=None)
    run = export_csv if fmt == "openclip-csv" else export_webdataset
    with progress:
        return run(
            source,
            out,
            template=template,
            filt=filt,
            images=images,
            on_start=lambda n: progress.update(task, total=n),
            on_pair=lambda: progress.advance(task),
        )
