"""The ``mine``, ``demo`` and ``pipelines`` commands: parse, build the config, call
:func:`ovseg_mine.mine.run.driver.mine`, print a summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from ovseg_mine import stop_signals
from ovseg_mine.cli.common import SET_HELP, fail, setup_logging

if TYPE_CHECKING:
    from ovseg_mine.mine.sources import MineInput

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
        ids = [int(tok) for tok in text.replace(",", " ").split()]
    except ValueError:
        fail(f"--image-ids must be integers separated by commas or spaces, or a file of them: {image_ids[:80]!r}")
    if not ids:  # an empty selection would be a 'complete' run of 0 images
        where = f"the file {image_ids}" if path.is_file() else "it"
        fail(f"--image-ids names no image id ({where} is empty); give ids, or leave the option out to mine all")
    return ids


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


def _shards_done(out: str) -> str:
    from ovseg_mine.shards import ShardError, read_manifest

    try:
        shards = read_manifest(out)["shards"]
    except (ShardError, KeyError):
        return "finished shards are"
    return f"{len(shards)} finished shard{'s' if len(shards) != 1 else ''} ({sum(s['rows'] for s in shards)} pairs)"


#: Config keys that the command's input options set, not ``--set``.
_INPUT_KEYS = {
    "source.kind": "the source kind comes from --source KIND:LOCATION (or --captions F --images DIR)",
    "proposals.kind": "the masks come from --proposals KIND:LOCATION (SAM's without it)",
}


def _input(
    source: Optional[str], captions: Optional[str], images: Optional[str], proposals: Optional[str]
) -> "MineInput":
    """The checked :class:`~ovseg_mine.mine.sources.MineInput` of the source options (a one-line error on a bad
    combination)."""
    from ovseg_mine.mine.sources import MineInput, SourceError

    try:
        return MineInput.from_options(source=source, captions=captions, images=images, proposals=proposals)
    except SourceError as exc:
        fail(str(exc))


def _check_overrides(overrides: list[str]) -> None:
    """Refuse a ``--set`` of what the input options say (one line naming the option to use)."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in _INPUT_KEYS:
            fail(f"--set {key}: {_INPUT_KEYS[key]}, not --set")


def _run_mine(
    pipeline: str,
    overrides: list[str],
    values: dict[str, dict[str, Any]],
    what: "MineInput",
    out: str,
    ray_address: Optional[str],
    overwrite: bool,
    verbose: bool = False,
    retry_failed: bool = False,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ovseg_mine.config import ConfigError, build_config
    from ovseg_mine.mine.algorithms.nouns import SpacyModelMissing
    from ovseg_mine.mine.run.driver import RunError, mine
    from ovseg_mine.mine.sources import SourceError
    from ovseg_mine.ray_session import RayStartError
    from ovseg_mine.weights_info import WeightsError

    setup_logging()
    _check_overrides(overrides)
    started = time.perf_counter()
    stop_signals.install()  # SIGTERM (a scheduler's stop request) stops a run as Ctrl-C does: cleanly, resumable
    try:
        cfg = build_config(pipeline, list(overrides), values)
        progress = Progress(
            TextColumn("mining"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[pairs]} pairs"),
            TimeElapsedColumn(),
        )
        task = progress.add_task("mine", total=None, rate="", pairs=0)

        def on_progress(done: int, total: Optional[int], pairs: int) -> None:
            if not progress.live.is_started:  # shown once models are loaded and images flow
                progress.start()
            rate = done / max(1e-9, time.perf_counter() - started)
            progress.update(task, completed=done, total=total, rate=f"{rate:.2f} img/s", pairs=pairs)

        try:
            manifest = mine(
                cfg,
                what,
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
        _summary(manifest, out)
    except (ConfigError, SourceError, RunError, RayStartError, WeightsError, SpacyModelMissing) as exc:
        fail(str(exc))
    except KeyboardInterrupt as exc:
        name, code = (exc.name, exc.exit_code) if isinstance(exc, stop_signals.StopRequested) else ("SIGINT", 130)
        typer.echo(f"stopped by {name}: {_shards_done(out)} kept in {out}; rerun the same command to resume", err=True)
        raise typer.Exit(code) from None
    finally:  # the run has ended and said so: a signal from here on ends the process as it would any program
        stop_signals.uninstall()


def mine_command(
    source: Optional[str] = typer.Option(
        None,
        "--source",
        help="KIND:LOCATION: hf:NAME_OR_PATH, webdataset:PATHS, img2dataset:DIR, folder:DIR, coco:JSON "
        "(see the README's 'Mining your data'; locations may be s3:// gs:// file:// URIs).",
    ),
    captions: Optional[str] = typer.Option(
        None, "--captions", help="COCO captions JSON (e.g. annotations/captions_train2017.json; a path or a URI)."
    ),
    images: Optional[str] = typer.Option(
        None, "--images", help="COCO: image root the JSON's file_name entries are relative to (a path or a URI)."
    ),
    out: str = typer.Option(
        ..., "--out", help="Run folder for shards and manifest: a path or an s3:// gs:// file:// URI (resumed)."
    ),
    split: Optional[str] = typer.Option(None, "--split", help="hf: the split (default: train, or the only one)."),
    hf_config: Optional[str] = typer.Option(None, "--hf-config", help="hf: the Hub dataset's configuration."),
    image_column: Optional[str] = typer.Option(None, "--image-column", help="Column holding the image."),
    caption_column: Optional[str] = typer.Option(
        None, "--caption-column", help="Column or JSON field holding a caption or a list of captions."
    ),
    id_column: Optional[str] = typer.Option(
        None, "--id-column", help="Integer column or JSON field holding the image id (default: hashed keys)."
    ),
    proposals: Optional[str] = typer.Option(
        None,
        "--proposals",
        help="Masks you already have instead of SAM's: coco:INSTANCES_OR_PANOPTIC_JSON or sa1b:DIR.",
    ),
    pipeline: str = typer.Option(
        "coco-ovseg", "--pipeline", "-p", help="Recipe name (see `ovseg-mine pipelines`) or .toml path."
    ),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    limit: Optional[int] = typer.Option(
        None, "--limit", min=1, help="Mine only the first N images (COCO: by image id; other sources: in source order)."
    ),
    image_ids: Optional[str] = typer.Option(None, "--image-ids", help="Comma-separated image ids, or a file of ids."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard a run with another config in --out."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help=RETRY_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
) -> None:
    """Mine mask-noun pairs from an image-caption dataset into Parquet shards."""
    what = _input(source, captions, images, proposals)
    options = {
        "split": split,
        "hf_config": hf_config,
        "image_column": image_column,
        "caption_column": caption_column,
        "id_column": id_column,
        "limit": limit,
        "image_ids": _parse_ids(image_ids),
    }
    _run_mine(pipeline, overrides, {"source": options}, what, out, ray_address, overwrite, verbose, retry_failed)


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
    from ovseg_mine.mine.sources import MineInput
    from ovseg_mine.resources import sample_dir

    sample = sample_dir()
    what = MineInput("coco", str(sample / "captions.json"), image_root=str(sample / "images"))
    _run_mine(pipeline, overrides, {"source": {"limit": limit}}, what, out, ray_address, overwrite, verbose)


def pipelines_command() -> None:
    """List the bundled recipes with their first comment line."""
    from ovseg_mine.resources import list_pipelines, pipeline_path

    for name in list_pipelines():
        path = pipeline_path(name)
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        typer.echo(f"{name:12s} {first}")
