"""The ``ovseg-mine`` command line: parses, loads the config, calls the library. No logic of its own.

Heavy libraries are imported inside the commands, so ``ovseg-mine --help`` stays instant.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(
    name="ovseg-mine",
    help="Mine mask-noun pairs from image-caption data (COCO Captions) for mask-adapted CLIP (OVSeg).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_SET_HELP = "Override a recipe value, e.g. --set sam.points_per_side=16 --set clip.pretrained=/path/ckpt.pt (repeatable)."


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _parse_ids(image_ids: Optional[str]) -> list[int] | None:
    if image_ids is None:
        return None
    path = Path(image_ids)
    text = path.read_text(encoding="utf-8") if path.is_file() else image_ids
    try:
        return [int(tok) for tok in text.replace(",", " ").split()]
    except ValueError:
        _fail(f"--image-ids must be integers separated by commas or spaces, or a file of them: {image_ids[:80]!r}")
    return None


def _summary(manifest: dict[str, Any], out: Path) -> None:
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


def _shards_done(out: Path) -> str:
    import json

    try:
        shards = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["shards"]
    except (OSError, ValueError, KeyError):
        return "finished shards are"
    return f"{len(shards)} finished shard{'s' if len(shards) != 1 else ''} ({sum(s['rows'] for s in shards)} pairs)"


def _run_mine(pipeline: str, captions: Path, images: Path, out: Path, overrides: list[str], limit: Optional[int],
              image_ids: Optional[str], ray_address: Optional[str], overwrite: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ovseg_mine.config import ConfigError, build_config
    from ovseg_mine.models import WeightsError
    from ovseg_mine.nouns import SpacyModelMissing
    from ovseg_mine.pipeline import RunError, mine
    from ovseg_mine.sources import SourceError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
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
        progress = Progress(TextColumn("mining"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                            TextColumn("{task.fields[pairs]} pairs"), TimeElapsedColumn())
        task = progress.add_task("mine", total=None, rate="", pairs=0)

        def on_progress(done: int, total: int, pairs: int) -> None:
            if not progress.live.is_started:  # shown once models are loaded and images flow
                progress.start()
            rate = done / max(1e-9, time.perf_counter() - started)
            progress.update(task, completed=done, total=total, rate=f"{rate:.2f} img/s", pairs=pairs)

        try:
            manifest = mine(cfg, captions, images, out, ray_address=ray_address, overwrite=overwrite,
                            on_progress=on_progress)
        finally:
            if progress.live.is_started:
                progress.stop()
    except (ConfigError, SourceError, RunError, WeightsError, SpacyModelMissing) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo(f"interrupted: {_shards_done(out)} kept in {out}; rerun the same command to resume", err=True)
        raise typer.Exit(130)
    _summary(manifest, out)


@app.command("mine")
def mine_command(
    captions: Path = typer.Option(..., "--captions", help="COCO captions JSON (e.g. annotations/captions_train2017.json)."),
    images: Path = typer.Option(..., "--images", help="Image root the JSON's file_name entries are relative to."),
    out: Path = typer.Option(..., "--out", help="Run folder for shards and manifest (resumed if it exists)."),
    pipeline: str = typer.Option("coco-ovseg", "--pipeline", "-p", help="Recipe name (see `ovseg-mine pipelines`) or .toml path."),
    overrides: list[str] = typer.Option([], "--set", help=_SET_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Mine only the first N images (by image id)."),
    image_ids: Optional[str] = typer.Option(None, "--image-ids", help="Comma-separated image ids, or a file of ids."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster (default: start a local Ray)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard a run with another config in --out."),
) -> None:
    """Mine mask-noun pairs from a COCO Captions dataset into Parquet shards."""
    _run_mine(pipeline, captions, images, out, overrides, limit, image_ids, ray_address, overwrite)


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run folder."),
    pipeline: str = typer.Option("demo", "--pipeline", "-p", help="Recipe: demo (real weights if reachable) or smoke."),
    overrides: list[str] = typer.Option([], "--set", help=_SET_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Mine only the first N sample images."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard a run with another config in --out."),
) -> None:
    """Mine the bundled sample (16 COCO val2017 images with their captions)."""
    from ovseg_mine.resources import sample_dir

    sample = sample_dir()
    _run_mine(pipeline, sample / "captions.json", sample / "images", out, overrides, limit, None, ray_address, overwrite)


@app.command("pipelines")
def pipelines_command() -> None:
    """List the bundled recipes with their first comment line."""
    from ovseg_mine.resources import list_pipelines, pipeline_path

    for name in list_pipelines():
        path = pipeline_path(name)
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        typer.echo(f"{name:12s} {first}")


# --- inspect command (ovseg_mine.quality) ---
@app.command("inspect")
def inspect_command(
    run: Path = typer.Argument(..., help="Run folder (manifest.json + shards/)."),
    gt: Optional[Path] = typer.Option(None, "--gt", help="COCO instances (or panoptic) JSON of the same images: adds agreement with ground truth."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON (stdout) instead of text."),
    report: Optional[Path] = typer.Option(None, "--report", help="Report folder (default RUN/report)."),
    no_report: bool = typer.Option(False, "--no-report", help="Only print the figures; write no HTML report."),
    gallery: int = typer.Option(48, "--gallery", min=0, help="Pairs shown in the report's gallery."),
    seed: int = typer.Option(0, "--seed", help="Seed of the gallery's sampling (same seed, same pairs)."),
) -> None:
    """Quality figures of a run: counts, score distributions, nouns, duplicates, ground-truth agreement; HTML report."""
    import json

    from ovseg_mine.quality import InspectError, format_summary, inspect_run

    try:
        insp = inspect_run(run, gt)
        path = None
        if not no_report:
            from ovseg_mine.report import write_report

            path = write_report(insp, report or run / "report", gallery=gallery, seed=seed)
    except InspectError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write the report: {exc}")
    typer.echo(json.dumps(insp.figures, indent=2, sort_keys=True) if as_json else format_summary(insp.figures))
    if path is not None:
        typer.echo(f"report: {path}", err=as_json)


# --- publish command (ovseg_mine.hub) ---
@app.command("publish")
def publish_command(
    run: Path = typer.Argument(..., help="Run folder (manifest.json + shards/)."),
    repo_id: Optional[str] = typer.Option(None, "--repo-id", help="Dataset repository USER/NAME (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to upload to (created if missing)."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="Commit message of the upload."),
    token: Optional[str] = typer.Option(None, "--token", show_default=False,
                                        help="Hub token (default: HF_TOKEN or the `hf auth login` cache)."),
    embed: Optional[str] = typer.Option(None, "--embed", help="'crops': add the masked crop of each pair as a PNG."),
    crop_size: int = typer.Option(224, "--crop-size", min=8, help="Side in pixels of the embedded crops."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Publish the finished shards of an unfinished run."),
    dry_run: Optional[Path] = typer.Option(None, "--dry-run", help="Write the folder that would be uploaded here and stop."),
) -> None:
    """Upload a run to the Hugging Face Hub as a Parquet dataset with a dataset card."""
    from ovseg_mine.hub import PublishError, build_folder, publish

    def warn(message: str) -> None:
        typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)

    try:
        if dry_run is not None:
            built = build_folder(run, dry_run, embed=embed, crop_size=crop_size, allow_partial=allow_partial,
                                 repo_id=repo_id)
            for message in built.warnings:
                warn(message)
            typer.echo(f"dry run: {built.rows} pairs in {len(built.files)} Parquet file(s) + README.md in {dry_run}")
            return
        if not repo_id:
            _fail("--repo-id USER/NAME is required (or --dry-run DIR)")
        url = publish(run, repo_id, token=token, private=private, revision=revision, commit_message=commit_message,
                      embed=embed, crop_size=crop_size, allow_partial=allow_partial, on_warning=warn)
    except PublishError as exc:
        _fail(str(exc))
    typer.echo(f"published: {url}")



# --- finetune and evaluate commands (ovseg_mine.finetune) ---
from ovseg_mine.finetune.cli import evaluate_command, finetune_command  # noqa: E402  (typer only; no heavy imports)

app.command("finetune")(finetune_command)
app.command("evaluate")(evaluate_command)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
