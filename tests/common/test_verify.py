"""Readers verify what they read, and the shards folder reads with standard tools (issue 19, items 4 and 6).

A swapped shard (a copy of another) and a one-byte change inside a string column are refused by ``inspect``,
``finetune`` and ``publish`` (CLI, exit 2, the shard named) and skipped and listed with ``--skip-damaged``;
``finetune``'s ``shards_id`` hashes the files; a run in the old layout (markers inside ``shards/``) reads and
resumes; the README's reading snippets run against a mined run. The run is the session's real smoke run
(``smoke_run``: 16 images, 3 shards), copied before it is changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ovseg_mine.done_record import DoneRecord
from ovseg_mine.finetune.data import DataError, scan_shards
from ovseg_mine.shards import move_legacy_markers, pair_schema, read_done, remove_partial_writes, write_shard
from ovseg_mine.storage import resolve
from ovseg_mine.verify import DamagedShardError, read_pairs, shard_files, verify_shards

from helpers.cli import REPO, run_cli
from helpers.runs import handmade_pairs, remark_shard

VICTIM = "shard-00001.parquet"


def _copy(smoke_run: Path, dest: Path) -> Path:
    return Path(shutil.copytree(smoke_run, dest, ignore=shutil.ignore_patterns(".lock", "report")))


def _swap(run: Path) -> None:
    """Shard 1 replaced by a copy of shard 0 (a valid ovseg-mine shard, the wrong one)."""
    shutil.copyfile(run / "shards" / "shard-00000.parquet", run / "shards" / VICTIM)


def _change_one_byte_in_a_string_column(run: Path, column: str = "noun") -> tuple[str, str]:
    """Flip one bit inside the ``column`` chunk of shard 1 so that the file still reads with pyarrow, with one
    value changed: the silent damage only a checksum catches. Returns (value before, value after)."""
    path = run / "shards" / VICTIM
    data = path.read_bytes()
    before = pq.read_table(io.BytesIO(data)).column(column).to_pylist()
    chunk = next(c for c in _column_chunks(path) if c.path_in_schema == column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    for pos in range(start, start + chunk.total_compressed_size):
        changed = bytearray(data)
        changed[pos] ^= 0x01
        try:
            after = pq.read_table(io.BytesIO(bytes(changed))).column(column).to_pylist()
        except (pa.ArrowException, OSError):
            continue
        if after != before:
            path.write_bytes(bytes(changed))
            return next((b, a) for b, a in zip(before, after, strict=True) if b != a)
    raise AssertionError(f"no single-bit change of {column} reads silently")


def _column_chunks(path: Path) -> list:
    group = pq.ParquetFile(path).metadata.row_group(0)
    return [group.column(i) for i in range(group.num_columns)]


DAMAGE = {"swapped": _swap, "one byte in a string": _change_one_byte_in_a_string_column}


def _to_old_layout(run: Path) -> None:
    """The layout of earlier versions: done markers as shards/shard-N.done.json, no done/ folder."""
    for marker in sorted((run / "done").glob("shard-*.json")):
        marker.rename(run / "shards" / marker.name.replace(".json", ".done.json"))
    (run / "done").rmdir()


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


# -- the verified read, on a local disk and an object store ---------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def run_root(request, tmp_path) -> str:
    return str(tmp_path / "run") if request.param == "local" else request.getfixturevalue("s3") + "/run"


def test_every_kind_of_damage_is_named_or_skipped_and_listed(run_root):
    run = resolve(run_root)
    table = pa.Table.from_pylist(handmade_pairs(), schema=pair_schema())
    for i in range(5):
        write_shard(run_root, i, table.slice(i, 2), file_metadata={}, done_record=DoneRecord(), row_group_size=10)
    intact = verify_shards(run_root)
    assert [s.index for s in intact.shards] == list(range(5)) and not intact.damaged
    assert all(s.sha256 == s.record.sha256 == hashlib.sha256(s.file.read_bytes()).hexdigest() for s in intact.shards)
    shards, done = run.join("shards"), run.join("done")
    shards.join(VICTIM).write_bytes(shards.join("shard-00000.parquet").read_bytes())  # 1: a copy of shard 0
    shards.join("shard-00002.parquet").delete()  # 2: its marker left
    done.join("shard-00003.json").delete()  # 3: a file without marker
    done.join("shard-00004.json").write_bytes(done.join("shard-00000.json").read_bytes())  # 4: names shard 0

    with pytest.raises(DamagedShardError) as caught:
        verify_shards(run_root)
    message = str(caught.value)
    assert message.startswith(f"{VICTIM} is damaged: sha256 ") and "!= its done marker's" in message
    assert "--skip-damaged" in message and "(4 damaged: shard-00001.parquet, shard-00002.parquet," in message
    assert "\n" not in message
    with pytest.raises(DamagedShardError):
        shard_files(run_root)
    with pytest.raises(DamagedShardError):
        read_pairs(run_root)

    checked = verify_shards(run_root, skip_damaged=True)
    assert [s.index for s in checked.shards] == [0]
    assert [(d.name, d.kind) for d in checked.damaged] == [
        (VICTIM, "mismatch"),
        ("shard-00002.parquet", "missing"),
        ("shard-00003.parquet", "uncommitted"),
        ("shard-00004.parquet", "marker"),
    ]
    assert "names 'shards/shard-00000.parquet'" in checked.damaged[3].reason
    assert read_pairs(run_root, skip_damaged=True).column("noun").to_pylist() == ["puppy", "man"]


def test_a_one_byte_change_reads_silently_with_pyarrow_and_is_refused(smoke_run, tmp_path):
    run = _copy(smoke_run, tmp_path / "run")
    before, after = _change_one_byte_in_a_string_column(run)
    assert before != after and len(before) == len(after)  # e.g. "bear" -> "beat": nothing else would notice
    with pytest.raises(DamagedShardError, match=f"^{VICTIM} is damaged: sha256 "):
        read_pairs(run)
    assert sorted(read_done(run)) == [0, 2]  # and mine redoes it: the resume check agrees


# -- the commands ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", DAMAGE)
def test_inspect_refuses_a_damaged_shard_and_skips_it_when_asked(smoke_run, tmp_path, damage):
    run = _copy(smoke_run, tmp_path / "run")
    DAMAGE[damage](run)
    err = _one_line_error(run_cli("inspect", str(run), "--no-report", timeout=300))
    assert f"error: {VICTIM} is damaged: sha256 " in err and "--skip-damaged" in err

    skipped = run_cli("inspect", str(run), "--json", "--no-report", "--skip-damaged", timeout=300)
    assert skipped.returncode == 0, skipped.stderr
    assert f"warning: skipped damaged shard {VICTIM}: sha256 " in skipped.stderr
    figures = json.loads(skipped.stdout)
    assert [(d["file"], d["kind"]) for d in figures["damaged_shards"]] == [(VICTIM, "mismatch")]
    kept = [record for index, record in read_done(smoke_run).items() if index != 1]
    assert figures["counts"]["pairs"] == sum(record.rows for record in kept) < read_pairs(smoke_run).num_rows
    assert figures["counts"]["images"] == sum(len(record.image_ids) for record in kept)


@pytest.mark.slow
def test_inspect_lists_skipped_shards_in_its_summary_and_report(smoke_run, tmp_path):
    run = _copy(smoke_run, tmp_path / "run")
    _swap(run)
    text = run_cli("inspect", str(run), "--skip-damaged", "--report", str(tmp_path / "report"), timeout=300)
    assert text.returncode == 0, text.stderr
    assert "skipped 1 damaged shard(s)" in text.stdout and f"  {VICTIM}: sha256 " in text.stdout
    assert VICTIM in (tmp_path / "report" / "index.html").read_text()


@pytest.mark.parametrize("damage", DAMAGE)
def test_finetune_refuses_a_damaged_shard(smoke_run, tmp_path, damage):
    run = _copy(smoke_run, tmp_path / "run")
    DAMAGE[damage](run)
    err = _one_line_error(run_cli("finetune", "--shards", str(run), "--out", str(tmp_path / "ft"), timeout=300))
    assert f"error: {VICTIM} is damaged: sha256 " in err and "--skip-damaged" in err
    assert not (tmp_path / "ft").exists()  # nothing trained, nothing written


def test_finetune_skips_damaged_shards_when_asked_and_its_id_hashes_the_files(smoke_run, tmp_path):
    run = _copy(smoke_run, tmp_path / "run")
    _swap(run)
    out = tmp_path / "ft"
    args = ["finetune", "--shards", str(run), "--out", str(out), "--max-steps", "1", "--batch-size", "4"]
    result = run_cli(*args, "--loader-workers", "0", "--warmup-steps", "0", "--skip-damaged", timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"skipping damaged shard {VICTIM} (sha256 " in result.stderr
    assert f"skipped 1 damaged shard(s): {VICTIM} (sha256 " in result.stdout
    meta = json.loads((out / "metadata.json").read_text())["shards"]
    assert len(meta["damaged_shards"]) == 1 and meta["damaged_shards"][0].startswith(VICTIM)
    kept = [run / "shards" / "shard-00000.parquet", run / "shards" / "shard-00002.parquet"]
    assert meta["shards_id"] == _shards_id(kept)
    assert meta["rows"] == sum(pq.ParquetFile(p).metadata.num_rows for p in kept)


def _shards_id(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
    return digest.hexdigest()


def test_shards_id_is_the_hash_of_the_files_read(smoke_run, tmp_path):
    assert scan_shards(smoke_run).shards_id == _shards_id(sorted((smoke_run / "shards").glob("*.parquet")))
    run = _copy(smoke_run, tmp_path / "run")
    _change_one_byte_in_a_string_column(run)
    with pytest.raises(DataError, match=f"^{VICTIM} is damaged"):
        scan_shards(run)
    # the marker rewritten to match (a hand-edited run): it verifies, and the id is that of the bytes read
    remark_shard(run, 1)
    index = scan_shards(run)
    assert index.shards_id == _shards_id(sorted((run / "shards").glob("*.parquet"))) != scan_shards(smoke_run).shards_id


@pytest.mark.parametrize("allow_partial", [False, True])
def test_publish_never_skips_a_damaged_shard(smoke_run, tmp_path, allow_partial):
    run = _copy(smoke_run, tmp_path / "run")
    _swap(run)
    extra = ["--allow-partial"] if allow_partial else []
    err = _one_line_error(run_cli("publish", str(run), "--dry-run", str(tmp_path / "hub"), *extra, timeout=300))
    assert f"error: {VICTIM} is damaged: sha256 " in err and "publish never skips a damaged shard" in err


# -- the old layout -------------------------------------------------------------------------------------------


def test_a_run_in_the_old_layout_reads_and_verifies(smoke_run, tmp_path):
    run = _copy(smoke_run, tmp_path / "run")
    _to_old_layout(run)
    assert read_done(run) == read_done(smoke_run)
    assert read_pairs(run).equals(read_pairs(smoke_run))
    assert scan_shards(run).shards_id == scan_shards(smoke_run).shards_id
    result = run_cli("inspect", str(run), "--json", "--no-report", timeout=300)
    assert result.returncode == 0, result.stderr
    _swap(run)
    assert f"error: {VICTIM} is damaged" in _one_line_error(run_cli("inspect", str(run), "--no-report"))


def test_moving_old_markers_is_idempotent_and_survives_a_stop(smoke_run, tmp_path):
    run = _copy(smoke_run, tmp_path / "run")
    _to_old_layout(run)
    (run / "done").mkdir()
    shutil.copyfile(run / "shards" / "shard-00000.done.json", run / "done" / "shard-00000.json")  # stopped mid-move
    (run / "done" / "shard-00001.json.tmp").write_text("{")  # and inside a marker write
    assert remove_partial_writes(run) == ["done/shard-00001.json.tmp"]
    assert move_legacy_markers(run) == [f"shard-0000{i}.done.json" for i in range(3)]
    assert sorted(p.name for p in (run / "shards").iterdir()) == [f"shard-0000{i}.parquet" for i in range(3)]
    assert read_done(run) == read_done(smoke_run) and move_legacy_markers(run) == []


@pytest.mark.slow
def test_mine_resumes_a_run_in_the_old_layout_and_moves_its_markers(smoke_run, tmp_path):
    run = _copy(smoke_run, tmp_path / "run")
    _to_old_layout(run)
    before = {p.name: p.read_bytes() for p in (run / "shards").glob("*.parquet")}
    result = run_cli("demo", "--pipeline", "smoke", "--out", str(run), "--set", "shards.images_per_shard=6")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["timings"]["images_this_invocation"] == 0
    assert {p.name: p.read_bytes() for p in (run / "shards").iterdir()} == before  # only Parquet files, unchanged
    assert read_done(run) == read_done(smoke_run)
    assert "moved the done marker shards/shard-00000.done.json to done/" in (run / "mine.log").read_text()


@pytest.mark.slow
@pytest.mark.slow
def test_mine_finishes_a_partial_run_in_the_old_layout(smoke_run, tmp_path):
    """An old-layout run that stopped before its last shard: the resume mines that shard alone, writes its marker
    in done/, moves the others, and ends with the shards of the uninterrupted run, byte for byte."""
    run = _copy(smoke_run, tmp_path / "run")
    _to_old_layout(run)
    (run / "shards" / "shard-00002.parquet").unlink()
    (run / "shards" / "shard-00002.done.json").unlink()
    result = run_cli("demo", "--pipeline", "smoke", "--out", str(run), "--set", "shards.images_per_shard=6")
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "manifest.json").read_text())["timings"]["images_this_invocation"] == 4
    digests = {p.name: p.read_bytes() for p in sorted((run / "shards").iterdir())}
    assert digests == {p.name: p.read_bytes() for p in sorted((smoke_run / "shards").iterdir())}
    assert sorted(p.name for p in (run / "done").iterdir()) == [f"shard-0000{i}.json" for i in range(3)]


# -- the README's reading snippets ----------------------------------------------------------------------------


def readme_reading_snippets() -> list[str]:
    """The Python blocks of the README's "Reading pairs back" section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Reading pairs back", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
def test_readme_reading_snippets_run_on_a_mined_run(smoke_run, tmp_path):
    snippets = readme_reading_snippets()
    assert len(snippets) == 4 and "read_parquet('runs/coco/shards/*')" in snippets[3]
    assert 'load_dataset("parquet", data_dir="runs/coco/shards"' in snippets[2]
    _copy(smoke_run, tmp_path / "runs" / "coco")
    rows = read_pairs(smoke_run).num_rows
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    for snippet in snippets:
        result = subprocess.run(
            [sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
        )
        assert result.returncode == 0, snippet + result.stderr
        assert result.stdout.startswith(f"{rows} pairs"), snippet + result.stdout
