"""The ``publish`` command: a run to the Hugging Face Hub, or to a folder with ``--dry-run``
(:mod:`ovseg_mine.publish`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ovseg_mine.cli.common import fail, warn


def publish_command(
    run: str = typer.Argument(..., help="Run folder (manifest.json + shards/): a path or an s3:// gs:// file:// URI."),
    repo_id: Optional[str] = typer.Option(None, "--repo-id", help="Dataset repository USER/NAME (created if missing)."),
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
) -> None:
    """Upload a run to the Hugging Face Hub as a Parquet dataset with a dataset card.

    Every shard is checked against its done marker first. A damaged shard is refused, never skipped: a public
    dataset should not have a hole that nobody can explain, and rerunning `mine` with the same --out redoes
    exactly the damaged shards.
    """
    from ovseg_mine.publish.hub import PublishError, build_folder, publish

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
