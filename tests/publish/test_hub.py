"""ovseg-mine publish: the dry-run folder, the upload calls (HfApi methods patched, no network), the refusals."""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from ovseg_mine.publish import hub
from ovseg_mine.shards import METADATA_KEY, pair_schema

from helpers.cli import run_cli
from helpers.runs import remark_shard

SECRET = "hf_TESTSECRETtokenXYZ0123456789abcdef"


def _card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def _pretrained_copy(smoke_run: Path, dest: Path) -> Path:
    """A copy of the smoke run whose manifest claims pretrained weights (to reach the upload path)."""
    run = dest / "run"
    shutil.copytree(smoke_run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["weights"] = "pretrained"
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


@pytest.fixture(scope="module")
def dry_folder(smoke_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("publish") / "dataset"
    result = run_cli("publish", str(smoke_run), "--dry-run", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "randomly initialised" in result.stderr and "Traceback" not in result.stderr
    return out


def test_dry_run_layout_and_card(dry_folder, smoke_run):
    meta, body = _card(dry_folder)
    files = sorted(p.relative_to(dry_folder).as_posix() for p in (dry_folder / "data").iterdir())
    assert files and all(fnmatch.fnmatch(f, "data/train-*-of-*.parquet") for f in files)
    assert files[0] == f"data/train-00000-of-{len(files):05d}.parquet"
    (config,) = meta["configs"]
    globs = [d["path"] for d in config["data_files"] if d["split"] == "train"]
    assert all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files)
    rows = sum(pq.ParquetFile(dry_folder / f).metadata.num_rows for f in files)
    manifest = json.loads((smoke_run / "manifest.json").read_text())
    assert rows == manifest["counts"]["pairs"] > 0
    info = meta["dataset_info"]
    assert info["splits"] == [{"name": "train", "num_bytes": info["dataset_size"], "num_examples": rows}]
    assert info["download_size"] == sum((dry_folder / f).stat().st_size for f in files)
    assert 0 < info["dataset_size"] < 100 * info["download_size"]
    assert [f["name"] for f in info["features"]][:2] == ["pair_id", "image_id"]
    first = body.splitlines()[0]
    assert "random" in first and "meaningless" in first
    for needle in (
        "Liang, Feng",
        "2210.04150",
        "CC BY 4.0",
        "Flickr",
        "load_dataset",
        "mask_utils.decode",
        manifest["package_version"],
        manifest["config_hash"],
        "similarity |",
        "area_fraction",
    ):
        assert needle in body, needle


def test_dry_run_loads_with_datasets(dry_folder, smoke_run, tmp_path):
    import datasets

    meta, _ = _card(dry_folder)
    ds = datasets.load_dataset(str(dry_folder), split="train", cache_dir=str(tmp_path / "cache"))
    expected = datasets.Features._from_yaml_list(meta["dataset_info"]["features"])
    assert ds.features == expected == datasets.Features.from_arrow_schema(pair_schema().remove_metadata())
    assert ds.num_rows == meta["dataset_info"]["splits"][0]["num_examples"]
    source = pq.read_table(sorted((smoke_run / "shards").glob("*.parquet"))[0])
    assert ds[0]["pair_id"] == source["pair_id"][0].as_py()


def _bicubic_taps(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, 4] source indices that torch's bicubic resize (align_corners=False) reads for each output index."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src).astype(int)
    return np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)


def test_embed_crops_are_pngs_with_fill_background(smoke_run, tmp_path):
    from PIL import Image

    from ovseg_mine.rle import decode

    out = tmp_path / "dataset"
    result = run_cli("publish", str(smoke_run), "--dry-run", str(out), "--embed", "crops", "--crop-size", "64")
    assert result.returncode == 0, result.stderr
    meta, _ = _card(out)
    assert {"name": "crop", "dtype": "image"} in meta["dataset_info"]["features"]
    table = pq.read_table(sorted((out / "data").glob("*.parquet"))[0])
    assert b'"_type": "Image"' in table.schema.metadata[b"huggingface"]
    fill = np.round(np.array(hub.CLIP_MEAN_PIXEL)).astype(np.uint8)
    checked = 0
    for row in table.slice(0, 8).to_pylist():
        image = Image.open(io.BytesIO(row["crop"]["bytes"]))
        assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
        pixels = np.asarray(image)
        # Output pixels whose 4x4 bicubic taps (align_corners=False) all fall on background source pixels.
        x, y, w, h = row["bbox"]
        mask = decode(row["mask"])[y : y + h, x : x + w]
        rows_t, cols_t = _bicubic_taps(h, 64), _bicubic_taps(w, 64)
        background = ~mask[rows_t[:, :, None, None], cols_t[None, None, :, :]].any(axis=(1, 3))
        if background.any():
            assert (pixels[background] == fill).all()
            checked += 1
    assert checked > 0


class _Recorder:
    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []

    def patch(self, monkeypatch):
        from huggingface_hub import HfApi

        def method(name, result=None):
            def fake(api, *args, **kwargs):
                self.calls.append((name, args, kwargs))
                if name == "upload_folder":
                    folder = Path(kwargs["folder_path"])
                    kwargs["uploaded"] = sorted(
                        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                    )
                    kwargs["written"] = "".join(
                        p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file()
                    )
                return result

            return fake

        monkeypatch.setattr(HfApi, "create_repo", method("create_repo", "https://huggingface.co/datasets/u/d"))
        monkeypatch.setattr(HfApi, "create_branch", method("create_branch"))
        monkeypatch.setattr(HfApi, "upload_folder", method("upload_folder"))
        monkeypatch.setattr(HfApi, "upload_large_folder", method("upload_large_folder"), raising=False)
        monkeypatch.setattr(HfApi, "whoami", method("whoami", {"name": "u"}))
        return self


def test_upload_calls_and_token_never_shown(smoke_run, tmp_path, monkeypatch, caplog):
    """HfApi methods are patched (no HTTP): create_repo, create_branch, upload_folder, upload_large_folder."""
    from typer.testing import CliRunner

    from ovseg_mine.cli import app

    run = _pretrained_copy(smoke_run, tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    rec = _Recorder().patch(monkeypatch)
    caplog.set_level(logging.DEBUG)
    result = CliRunner().invoke(
        app,
        [
            "publish",
            str(run),
            "--repo-id",
            "u/d",
            "--private",
            "--revision",
            "v1",
            "--commit-message",
            "first pairs",
            "--token",
            SECRET,
        ],
    )
    assert result.exit_code == 0, result.output
    names = [c[0] for c in rec.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    _, args, kwargs = rec.calls[0]
    assert args == ("u/d",) and kwargs["repo_type"] == "dataset" and kwargs["private"] is True
    assert kwargs["exist_ok"] is True
    _, args, kwargs = rec.calls[1]
    assert args == ("u/d",) and kwargs == {"branch": "v1", "repo_type": "dataset", "exist_ok": True}
    _, _, kwargs = rec.calls[2]
    assert kwargs["repo_type"] == "dataset" and kwargs["revision"] == "v1" and kwargs["repo_id"] == "u/d"
    assert kwargs["commit_message"] == "first pairs"
    assert kwargs["uploaded"][0] == "README.md" and kwargs["uploaded"][1] == "data/train-00000-of-00001.parquet"
    assert SECRET not in kwargs["written"]
    assert SECRET not in result.output and "published:" in result.output
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    assert SECRET not in "".join(p.read_text("latin-1") for p in run.rglob("*") if p.is_file())


def test_upload_large_folder_above_threshold(smoke_run, tmp_path, monkeypatch):
    run = _pretrained_copy(smoke_run, tmp_path)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    rec = _Recorder().patch(monkeypatch)
    warnings = []
    hub.publish(run, "u/d", commit_message="m", large_folder_bytes=1, on_warning=warnings.append)
    assert [c[0] for c in rec.calls] == ["create_repo", "upload_large_folder"]
    kwargs = rec.calls[1][2]
    assert kwargs["repo_type"] == "dataset" and kwargs["private"] is False and kwargs["revision"] is None
    assert any("commit-message" in w for w in warnings)


def test_hub_errors_are_one_line(smoke_run, tmp_path, monkeypatch):
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from typer.testing import CliRunner

    from ovseg_mine.cli import app

    run = _pretrained_copy(smoke_run, tmp_path)

    def forbidden(*args, **kwargs):
        request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
        response = httpx2.Response(403, request=request)
        raise HfHubHTTPError(f"403 Forbidden: token {SECRET} cannot write", response=response)

    monkeypatch.setattr(HfApi, "create_repo", forbidden)
    result = CliRunner().invoke(app, ["publish", str(run), "--repo-id", "u/d", "--token", SECRET])
    assert result.exit_code == 2
    assert "no write permission on u/d" in result.output and len(result.output.strip().splitlines()) == 1
    assert SECRET not in result.output

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    result = CliRunner().invoke(app, ["publish", str(run), "--repo-id", "u/d"])
    assert result.exit_code == 2 and "no Hugging Face token" in result.output


def _one_line_error(result, needle: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], result.stderr


@pytest.mark.slow
def test_refusals(smoke_run, tmp_path):
    _one_line_error(
        run_cli("publish", str(smoke_run), "--repo-id", "u/d", "--token", SECRET), "randomly initialised weights"
    )

    _one_line_error(run_cli("publish", str(tmp_path), "--dry-run", str(tmp_path / "o1")), "not an ovseg-mine run")

    partial = tmp_path / "partial"
    shutil.copytree(smoke_run, partial)
    next((partial / "done").glob("shard-*.json")).unlink()
    _one_line_error(run_cli("publish", str(partial), "--dry-run", str(tmp_path / "o2")), "--allow-partial")
    ok = run_cli("publish", str(partial), "--dry-run", str(tmp_path / "o3"), "--allow-partial")
    assert ok.returncode == 0, ok.stderr
    assert "partial run" in (tmp_path / "o3" / "README.md").read_text()

    unknown = tmp_path / "unknown"
    shutil.copytree(smoke_run, unknown)
    shard = sorted((unknown / "shards").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    meta["schema_version"] = 99
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), shard)
    remark_shard(unknown, int(shard.stem.split("-")[1]))  # committed as a future ovseg-mine would
    _one_line_error(run_cli("publish", str(unknown), "--dry-run", str(tmp_path / "o4")), "schema version 99")
