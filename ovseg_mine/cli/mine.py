"""The ``mine``, ``demo`` and ``pipelines`` commands: parse, build the config, call
:func:`ovseg_mine.mine.pipeline.mine`, print a summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from ovseg_mine.cli.common import SET_HELP, fail, setup_logging

RAY_ADDRESS_HELP = (
    "Join this Ray cluster: HOST:PORT of its head, ray://HOST:10001, or auto (the one `ray start` started on this "
    "machine). Default: RAY_ADDRESS if set, else a new local Ray bound to 127.0.0.1."
)
RETRY_HELP = (
    "Resume, and also mine again the images that failed (listed with stage 'error'), rewriting only their shards; "
    "other rejects stay."
)
VERBOSE_HELP = "Also show Ray's own log lines (they always go to RUN/mine.log and Ray's session folder)."


def _parse_ids(image_ids: Optional[str]) -> list[int] | None:
    if image_ids is None:
        return None
    path = Path(image_ids)
    text = path.read_text(encoding="utf-8") if path.is_file() else image_ids
    try:
        return [int(tok) for tok in text.replace(",", " ").split()]
    except ValueError:
        fail(f"--image-ids must be integers separated by commas or spaces, or a file of them: {image_ids[:80]!r}")
    return None


def _summary(manifest: dict[str, Any], out: str) -> None:
    counts, timings = manifest["counts"], manifest["timings"]
    rejects = ", ".join(f"{k}: {v}" for k, v in sorted(counts["rejects_by_stage"].items())) or "none"
    typer.echo(
        f"{manifest['status']}: {counts['pairs']} pairs ({counts['unique_nouns']} unique nouns) from "
        f"{counts['images_with_pairs']}/{counts['images']} images in {timings['wall_s']:.1f} s "
        f"({timings['images_per_s']:.3f} images/s this run); rejected: {rejects}"
    )
    if manifest["weights"] == "random":
        typer.secho("note: randomly initialised weights were used: the pairs are meaningless", fg=typer.colors.YELLOW)
    typer.echo(f"shards and manifest: {out}")


def _interrupt_on_sigterm() -> None:
    """Make SIGTERM (a scheduler's or ``kill``'s stop request) stop a run like Ctrl-C: cleanly, resumable."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _shards_done(out: str) -> str:
    from ovseg_mine.shards import ShardError, read_manifest

    try:
        shards = read_manifest(out)["shards"]
    except (ShardError, KeyError):
        return "finished shards are"
    return f"{len(shards)} finished shard{'s' if len(shards) != 1 else ''} ({sum(s['rows'] for s in shards)} pairs)"


def _run_mine(
    pipeline: str,
    captions: str,
    images: str,
    out: str,
    overrides: list[str],
    limit: Optional[int],
    image_ids: Optional[str],
    ray_address: Optional[str],
    overwrite: bool,
    verbose: bool = False,
    retry_failed: bool = False,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ovseg_mine.config import ConfigError, build_config
    from ovseg_mine.mine.nouns import SpacyModelMissing
    from ovseg_mine.mine.pipeline import RunError, mine
    from ovseg_mine.mine.sources import SourceError
    from ovseg_mine.models import WeightsError
    from ovseg_mine.ray_session import RayStartError

    setup_logging()
    extra = list(overrides)
    if limit is not None:
        extra.append(f"source.limit={limit}")
    ids = _parse_ids(image_ids)
    if ids is not None:
        extra.append(f"source.image_ids={ids}")
    started = time.perf_counter()
    _interrupt_on_sigterm()
    try:
        cfg = build_config(pipeline, extra)
        progress = Progress(
            TextColumn("mining"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[pairs]} pairs"),
            TimeElapsedColumn(),
        )
        task = progress.add_task("mine", total=None, rate="", pairs=0)

        def on_progress(done: int, total: int, pairs: int) -> None:
            if not progress.live.is_started:  # shown once models are loaded and images flow
                progress.start()
            rate = done / max(1e-9, time.perf_counter() - started)
            progress.update(task, completed=done, total=total, rate=f"{rate:.2f} img/s", pairs=pairs)

        try:
            manifest = mine(
                cfg,
                captions,
                images,
                out,
                ray_address=ray_address,
                overwrite=overwrite,
                retry_failed=retry_failed,
                verbose=verbose,
                on_progress=on_progress,
            )
        finally:
            if progress.live.is_started:
                progress.stop()
    except (ConfigError, SourceError, RunError, RayStartError, WeightsError, SpacyModelMissing) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        typer.echo(f"interrupted: {_shards_done(out)} kept in {out}; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
    _summary(manifest, out)


def mine_command(
    captions: str = typer.Option(
        ..., "--captions", help="COCO captions JSON (e.g. annotations/captions_train2017.json; a path or a URI)."
    ),
    images: str = typer.Option(..., "--images", help="Image root the JSON's file_name entries are relative to."),
    out: str = typer.Option(
        ..., "--out", help="Run folder for shards and manifest: a path or an s3:// gs:// file:// URI (resumed)."
    ),
    pipeline: str = typer.Option(
        "coco-ovseg", "--pipeline", "-p", help="Recipe name (see `ovseg-mine pipelines`) or .toml path."
    ),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Mine only the first N images (by image id)."),
    image_ids: Optional[str] = typer.Option(None, "--image-ids", help="Comma-separated image ids, or a file of ids."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard a run with another config in --out."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help=RETRY_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
) -> None:
    """Mine mask-noun pairs from a COCO Captions dataset into Parquet shards."""
    _run_mine(
        pipeline, captions, images, out, overrides, limit, image_ids, ray_address, overwrite, verbose, retry_failed
    )


def demo_command(
    out: str = typer.Option("runs/demo", "--out", help="Run folder (a path or a URI)."),
    pipeline: str = typer.Option("demo", "--pipeline", "-p", help="Recipe: demo (real weights if reachable) or smoke."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Mine only the first N sample images."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard a run with another config in --out."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
) -> None:
    """Mine the bundled sample (16 COCO val2017 images with their captions)."""
    from ovseg_mine.resources import sample_dir

    sample = sample_dir()
    captions, images = str(sample / "captions.json"), str(sample / "images")
    _run_mine(pipeline, captions, images, out, overrides, limit, None, ray_address, overwrite, verbose)


def pipelines_command() -> None:
    """List the bundled recipes with their first comment line."""
    from ovseg_mine.resources import list_pipelines, pipeline_path

    for name in list_pipelines():
        path = pipeline_path(name)
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        typer.echo(f"{name:12s} {first}")
