"""Publish a run to the Hugging Face Hub as a Parquet dataset that ``datasets.load_dataset`` and the viewer read.

The uploaded folder::

    README.md                             dataset card: YAML header (configs, dataset_info) + text
                                          (ovseg_mine.publish.card)
    data/train-00000-of-000NN.parquet     the pairs, optionally with a ``crop`` Image column (lossless PNG)

Parquet files follow what ``datasets.push_to_hub`` writes (:mod:`ovseg_mine.publish.parquet`): at most ~500 MB
(uncompressed Arrow) per file, row groups of at most ~100 MB, page index and content-defined chunking (so a
re-upload of a changed run dedupes on the Hub's Xet storage), and the ``huggingface`` schema metadata with the
features. The folder is deterministic: building the same run twice gives byte-identical files, so an
interrupted upload can be rerun and only what is missing is sent.

Upload: ``HfApi.upload_folder`` with the commit message (in huggingface_hub >= 1.x with hf_xet it is the
resumable, multi-commit large-folder upload). On an older huggingface_hub that still has
``HfApi.upload_large_folder``, folders above :data:`LARGE_FOLDER_BYTES` use it instead (resumable, but it
writes its own commit messages: ``--commit-message`` is then ignored, with a warning).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ovseg_mine.crops import CLIP_MEAN_PIXEL  # noqa: F401  (the crop fill, part of this module's contract)
from ovseg_mine.publish import card as card_mod
from ovseg_mine.publish.parquet import MAX_FILE_BYTES, ParquetParts
from ovseg_mine.shards import ShardError, pair_schema, read_file_metadata, read_manifest, read_table, schema_spec
from ovseg_mine.storage import Location, first_line, resolve
from ovseg_mine.verify import damaged_message, verify_shards

log = logging.getLogger(__name__)

LARGE_FOLDER_BYTES = 5 * 1000**3  # above this, upload_large_folder where huggingface_hub has it
# the pair columns the card's counts and distributions are computed from
STAT_COLUMNS = ["image_id", "noun", "width", "height", "area", "similarity", "probability", "margin"]


class PublishError(Exception):
    """A run that cannot be published, or a Hub error; ``str(error)`` is a one-line reason (never the token)."""


@dataclass
class BuiltFolder:
    """What :func:`build_folder` wrote: ``rows`` pairs in ``files`` (paths relative to ``folder``),
    ``num_bytes`` uncompressed Arrow bytes, ``download_bytes`` Parquet bytes, and ``warnings`` (one-line)."""

    folder: Path
    rows: int
    files: list[str]
    num_bytes: int
    download_bytes: int
    warnings: list[str] = field(default_factory=list)


def load_manifest(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run's ``manifest.json`` (:func:`ovseg_mine.shards.read_manifest`).

    Raises:
        PublishError: the folder is not a run folder, or its manifest is not readable.
    """
    try:
        return read_manifest(run_dir)
    except ShardError as exc:
        raise PublishError(str(exc)) from exc


def publishable_shards(
    run_dir: str | os.PathLike[str], manifest: dict[str, Any], *, allow_partial: bool
) -> list[Location]:
    """The shard files to publish, in index order, after checking the run (a local path or a URI).

    Every shard file is checked against its done marker (:func:`ovseg_mine.verify.verify_shards`, its sha256
    streamed once) and must be an ovseg-mine shard of a known schema version. A damaged shard (a file whose
    sha256 is not its marker's, a marker without its file, an unreadable marker) is always refused, by name:
    publishing is a one-way act to a public repository, and ``mine`` on the same ``--out`` redoes exactly the
    damaged shards, byte-identical, so there is no reason to publish a dataset with an unexplained hole. A run
    is complete when the manifest says ``status: complete`` and each shard it lists has a done marker with the
    same sha256 as the file; a partial run is refused unless ``allow_partial`` (then only the committed
    shards are published; a file without a marker is not committed yet and is left out).

    Raises:
        PublishError: not a run folder, a damaged shard, unknown schema version, or an incomplete run without
            ``allow_partial``.
    """
    try:
        checked = verify_shards(run_dir, skip_damaged=True)
        damaged = [d for d in checked.damaged if d.kind != "uncommitted"]
        if damaged:
            raise PublishError(damaged_message(damaged, hint=None) + " (publish never skips a damaged shard)")
        for path in checked.files:
            read_file_metadata(path)
    except ShardError as exc:
        raise PublishError(str(exc)) from exc
    done = checked.records
    done_by_file = {rec.file: rec for rec in done.values()}
    problems = [f"{d.name} has no done marker (not committed)" for d in checked.damaged]
    if manifest.get("status") != "complete":
        problems.insert(0, f"manifest status is {manifest.get('status')!r}")
    for entry in manifest.get("shards", []):
        rec = done_by_file.get(entry.get("file"))
        if rec is None or rec.sha256 != entry.get("sha256"):
            problems.append(f"shard {entry.get('file')} has no matching done marker")
    if problems and not allow_partial:
        raise PublishError(
            f"incomplete run {run_dir}: {problems[0]} ({len(problems)} problem(s)); resume the "
            "mining to finish it, or pass --allow-partial to publish the finished shards"
        )
    run = resolve(run_dir)
    chosen = [run.join(done[i].file) for i in sorted(done)]
    if not chosen:
        raise PublishError(f"{run_dir} has no finished shard to publish")
    return chosen


def render_crops(table: "Any", image_root: str | os.PathLike[str], *, size: int = 224) -> list[bytes]:
    """Lossless PNG masked crops of pairs, rendered as mining does (ovseg_mine.crops).

    Args:
        table: Arrow table of pairs (``image_id``, ``file_name``, ``width``, ``height``, ``mask`` columns).
        image_root: folder the ``file_name`` entries are relative to (manifest ``source.image_root``; a local
            path or a URI).
        size: crop side in pixels.

    Returns:
        One PNG per row (RGB uint8, ``size`` x ``size``): tight box of the mask, background = CLIP mean pixel
        (rounded), bicubic resize, clamped to [0, 255].

    Raises:
        PublishError: a source image that is missing, unreadable or not of the row's size.
    """
    import numpy as np
    from PIL import Image

    from ovseg_mine.crops import masked_crop_images
    from ovseg_mine.images import ImageDecodeError, load_rgb
    from ovseg_mine.rle import decode

    rows = table.select(["image_id", "file_name", "width", "height", "mask"]).to_pylist()
    out: list[bytes] = [b""] * len(rows)
    by_image: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_image.setdefault(row["image_id"], []).append(i)
    for indices in by_image.values():
        first = rows[indices[0]]
        path = resolve(image_root).join(first["file_name"]).uri
        try:
            pixels = load_rgb(path)
        except ImageDecodeError as exc:
            raise PublishError(f"--embed crops needs the source images: {path}: {exc}") from exc
        if pixels.shape[:2] != (first["height"], first["width"]):
            raise PublishError(
                f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, the run mined it at {first['width']}x{first['height']}"
            )
        crops = masked_crop_images(pixels, np.stack([decode(rows[i]["mask"]) for i in indices]), size=size)
        for i, crop in zip(indices, crops, strict=True):
            buffer = io.BytesIO()
            Image.fromarray(crop, mode="RGB").save(buffer, format="PNG")
            out[i] = buffer.getvalue()
    return out


def _features(embed_size: Optional[int]) -> "Any":
    import datasets

    features = datasets.Features.from_arrow_schema(pair_schema().remove_metadata())
    if embed_size:
        features["crop"] = datasets.Image()
    return features


def build_folder(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    embed: Optional[str] = None,
    crop_size: int = 224,
    allow_partial: bool = False,
    repo_id: Optional[str] = None,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> BuiltFolder:
    """Write the folder that :func:`publish` uploads (README.md + data/train-*.parquet).

    Args:
        run_dir: the run folder.
        out_dir: target folder; created, or emptied of a previous build (refused when it holds other files).
        embed: None, or ``"crops"`` for a ``crop`` Image column of PNG masked crops (needs the source images).
        crop_size: crop side in pixels for ``embed="crops"``.
        allow_partial: publish the finished shards of an incomplete run.
        repo_id: ``USER/NAME`` shown in the card's loading snippet.
        max_file_bytes: uncompressed Arrow bytes per Parquet file.

    Returns:
        A :class:`BuiltFolder`; its warnings include the random-weights warning.

    Raises:
        PublishError: see :func:`publishable_shards`; a bad ``embed`` value; a non-empty foreign ``out_dir``.
    """
    _check_embed(embed)
    manifest = load_manifest(run_dir)
    sources = publishable_shards(run_dir, manifest, allow_partial=allow_partial)
    return _write_folder(
        run_dir,
        out_dir,
        manifest,
        sources,
        embed=embed,
        crop_size=crop_size,
        repo_id=repo_id,
        max_file_bytes=max_file_bytes,
    )


def _check_embed(embed: Optional[str]) -> None:
    if embed not in (None, "crops"):
        raise PublishError(f"--embed must be 'crops', got {embed!r}")


def _write_folder(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    manifest: dict[str, Any],
    sources: list[Location],
    *,
    embed: Optional[str],
    crop_size: int,
    repo_id: Optional[str],
    max_file_bytes: int = MAX_FILE_BYTES,
) -> BuiltFolder:
    """:func:`build_folder` after its checks: ``manifest`` loaded, ``sources`` from :func:`publishable_shards`."""
    import pyarrow as pa

    run = resolve(run_dir)
    partial = [s.uri for s in sources] != [run.join(e["file"]).uri for e in manifest.get("shards", [])] or manifest.get(
        "status"
    ) != "complete"
    warnings = []
    if manifest.get("weights") == "random":
        warnings.append("this run used randomly initialised weights: its pairs are meaningless")
    if partial:
        warnings.append("publishing an incomplete run: only its finished shards")
    out = Path(out_dir)
    if out.exists() and any(p.name not in ("README.md", "data") for p in out.iterdir()):
        raise PublishError(f"{out} is not empty: give an empty or new folder")
    data = out / "data"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    embed_size = crop_size if embed == "crops" else None
    features = _features(embed_size)
    schema = features.arrow_schema
    image_root = manifest.get("source", {}).get("image_root", "")
    stat_tables = []
    with ParquetParts(data, schema, max_file_bytes=max_file_bytes) as parts:
        for path in sources:
            table = read_table(path).replace_schema_metadata(None)
            stat_tables.append(table.select(STAT_COLUMNS))
            if embed_size:
                pngs = render_crops(table, image_root, size=embed_size)
                crop = pa.array([{"bytes": b, "path": None} for b in pngs], type=schema.field("crop").type)
                table = table.append_column("crop", crop)
            parts.write(table.select(schema.names).cast(schema))
    files = [path.relative_to(out).as_posix() for path in parts.files or []]
    download_bytes = sum((out / f).stat().st_size for f in files)
    stats = card_mod.pair_stats(pa.concat_tables(stat_tables) if stat_tables else pair_schema().empty_table())
    header = card_mod.card_header(
        card_mod.features_yaml(features.to_dict()),
        rows=parts.rows,
        num_bytes=parts.num_bytes,
        download_bytes=download_bytes,
        pretty_name="ovseg-mine COCO mask-noun pairs",
    )
    body = card_mod.card_body(
        manifest, stats, schema_spec()["fields"], repo_id=repo_id, embed_crops=embed_size, partial=partial
    )
    (out / "README.md").write_text(card_mod.render_card(header, body), encoding="utf-8")
    return BuiltFolder(out, parts.rows, files, parts.num_bytes, download_bytes, warnings)


def hub_error(exc: BaseException, repo_id: str, token: Optional[str]) -> PublishError:
    """``exc``, an error of huggingface_hub during an upload to ``repo_id``, as a one-line :class:`PublishError`
    that says what to do (log in, ask for access, check the name, retry later...)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalTokenNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, LocalTokenNotFoundError) or status == 401:
        message = "the Hub refused the token (missing or invalid): set HF_TOKEN, run `hf auth login`, or pass --token"
    elif isinstance(exc, GatedRepoError) or status == 403:
        message = f"no write permission on {repo_id}: use a token with write access to that namespace"
    elif isinstance(exc, RepositoryNotFoundError):
        message = f"repository {repo_id} not found or not accessible with this token"
    elif isinstance(exc, RevisionNotFoundError):
        message = f"revision not found in {repo_id}"
    elif status == 409:
        message = f"{repo_id} conflicts with an existing repository (another type or name): {first_line(exc)}"
    elif isinstance(exc, HfHubHTTPError):
        message = f"Hub error{f' (HTTP {status})' if status else ''}: {first_line(exc)}"
    else:
        message = f"upload failed: {type(exc).__name__}: {first_line(exc)}"
    if token:
        message = message.replace(token, "***")
    return PublishError(message)


def publish(
    run_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    token: Optional[str] = None,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    embed: Optional[str] = None,
    crop_size: int = 224,
    allow_partial: bool = False,
    large_folder_bytes: int = LARGE_FOLDER_BYTES,
    on_warning: Callable[[str], None] = log.warning,
) -> str:
    """Build the folder of a run in a temporary folder and upload it to the dataset repository ``repo_id``.

    Creates the repository (``repo_type="dataset"``, ``private``) when missing and the branch ``revision``
    when given; replaces the ``data/`` Parquet files of a previous upload. The token comes from ``token``,
    else huggingface_hub's usual places (HF_TOKEN, the login cache); it is never logged or written.

    Returns:
        The URL of the dataset repository.

    Raises:
        PublishError: a run with random weights, an incomplete run (without ``allow_partial``), no token, a bad
            ``embed`` value, or a Hub error (one line).
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError

    manifest = load_manifest(run_dir)
    if manifest.get("weights") == "random":
        raise PublishError(
            "refusing to upload a run mined with randomly initialised weights (manifest weights: "
            "random): its pairs are meaningless; use --dry-run DIR to inspect the folder"
        )
    sources = publishable_shards(run_dir, manifest, allow_partial=allow_partial)  # hashes every shard: once
    if not (token or get_token()):
        raise PublishError("no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass --token")
    api = HfApi(token=token or None)
    with tempfile.TemporaryDirectory(prefix="ovseg-mine-publish-") as tmp:
        _check_embed(embed)
        built = _write_folder(
            run_dir, Path(tmp) / "dataset", manifest, sources, embed=embed, crop_size=crop_size, repo_id=repo_id
        )
        for warning in built.warnings:
            on_warning(warning)
        message = commit_message or f"Upload {built.rows} mask-noun pairs with ovseg-mine"
        try:
            url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
            size = built.download_bytes + (built.folder / "README.md").stat().st_size
            if size > large_folder_bytes and hasattr(api, "upload_large_folder"):
                if commit_message:
                    on_warning("upload_large_folder writes its own commit messages: --commit-message is ignored")
                api.upload_large_folder(
                    repo_id=repo_id, folder_path=built.folder, repo_type="dataset", revision=revision, private=private
                )
            else:
                api.upload_folder(
                    repo_id=repo_id,
                    folder_path=built.folder,
                    repo_type="dataset",
                    revision=revision,
                    commit_message=message,
                    delete_patterns=["data/*.parquet"],
                )
        except (HfHubHTTPError, LocalTokenNotFoundError, HFValidationError, OSError, ValueError) as exc:
            raise hub_error(exc, repo_id, token) from exc
    return str(getattr(url, "url", url) or f"https://huggingface.co/datasets/{repo_id}")
