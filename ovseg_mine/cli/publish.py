"""The ``publish`` command: a run to the Hugging Face Hub, or to a folder with ``--dry-run``
(:mod:`ovseg_mine.publish`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ovseg_mine.cli.common import fail, warn


def publish_command(
    run: str = typer.Argument(
        ...,
        help="Run folder (manifest.json + shards/), or a finetune output folder: a path or an s3:// gs:// file:// URI.",
    ),
    repo_id: Optional[str] = typer.Option(
        None, "--repo-id", help="Dataset (run) or model (finetune) repository USER/NAME (created if missing)."
    ),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to upload to (created if missing)."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="Commit message of the upload."),
    token: Optional[str] = typer.Option(
        None, "--token", show_default=False, help="Hub token (default: HF_TOKEN or the `hf auth login` cache)."
    ),
    embed: Optional[str] = typer.Option(None, "--embed", help="'crops': add the masked crop of each pair as a PNG."),
    crop_size: int = typer.Option(224, "--crop-size", min=8, help="Side in pixels of the embedded crops."),
    allow_partial: bool = typer.Option(
        False,
        "--allow-partial",
        help="Publish the finished shards of an unfinished run. There is no --skip-damaged: a shard whose sha256 "
        "differs from its done marker is always refused, as `mine` on the same --out redoes it byte-identical.",
    ),
    dry_run: Optional[Path] = typer.Option(
        None, "--dry-run", help="Write the folder that would be uploaded here and stop."
    ),
    results: Optional[str] = typer.Option(
        None, "--results", help="Finetune: `evaluate --json` output for the model card (default: FOLDER/evaluate.json)."
    ),
) -> None:
    """Upload a run to the Hugging Face Hub as a Parquet dataset with a dataset card, or a finetune as an open_clip
    model (open_clip_config.json + open_clip_model.safetensors + mask prompts + model card).

    Every shard of a run is checked against its done marker first. A damaged shard is refused, never skipped: a
    public dataset should not have a hole that nobody can explain, and rerunning `mine` with the same --out redoes
    exactly the damaged shards.
    """
    from ovseg_mine.publish.hub import PublishError, build_folder, publish
    from ovseg_mine.publish.model import is_finetune

    if is_finetune(run):
        _publish_finetune(run, repo_id, token, private, revision, commit_message, dry_run, results)
        return

    try:
        if dry_run is not None:
            built = build_folder(
                run, dry_run, embed=embed, crop_size=crop_size, allow_partial=allow_partial, repo_id=repo_id
            )
            for message in built.warnings:
                warn(message)
            typer.echo(f"dry run: {built.rows} pairs in {len(built.files)} Parquet file(s) + README.md in {dry_run}")
            return
        if not repo_id:
            fail("--repo-id USER/NAME is required (or --dry-run DIR)")
        url = publish(
            run,
            repo_id,
            token=token,
            private=private,
            revision=revision,
            commit_message=commit_message,
            embed=embed,
            crop_size=crop_size,
            allow_partial=allow_partial,
            on_warning=warn,
        )
    except PublishError as exc:
        fail(str(exc))
    typer.echo(f"published: {url}")


def _publish_finetune(run, repo_id, token, private, revision, commit_message, dry_run, results) -> None:
    from ovseg_mine.publish.hub import PublishError
    from ovseg_mine.publish.model import build_model_folder, publish_model

    try:
        if dry_run is not None:
            built = build_model_folder(run, dry_run, repo_id=repo_id, results=results)
            for message in built.warnings:
                warn(message)
            typer.echo(f"dry run: {', '.join(built.files)} in {dry_run}")
            typer.echo(f'load it: open_clip.create_model_and_transforms("local-dir:{dry_run}")')
            return
        if not repo_id:
            fail("--repo-id USER/NAME is required (or --dry-run DIR)")
        url = publish_model(
            run,
            repo_id,
            token=token,
            private=private,
            revision=revision,
            commit_message=commit_message,
            results=results,
            on_warning=warn,
        )
    except PublishError as exc:
        fail(str(exc))
    typer.echo(f"published: {url}")
