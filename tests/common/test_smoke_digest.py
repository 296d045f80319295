"""What a smoke run writes, pinned: the session's ``smoke_run`` (bundled 16-image sample, ``smoke`` recipe, 6 images
per shard) against digests stored in ``tests/data/smoke_digest.json``, part by part, so that a refactor that
changes any pair, shard schema, shard metadata, done record, manifest or config is seen, and named.

What is left out is what differs between two identical runs or two clones: timings (``stage_s``, ``timings``), the
absolute paths of the source (a clone's location), and the files' sha256 (the shard metadata holds the source
path). Floats are compared to 5 decimals (the tiny random models on another CPU may round the last bits
differently). To record new digests after an intended change: ``python tests/common/test_smoke_digest.py RUN`` prints
them for a run made with ``ovseg-mine demo --pipeline smoke --out RUN --set shards.images_per_shard=6``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

DIGESTS = Path(__file__).resolve().parents[1] / "data" / "smoke_digest.json"
SOURCE_PATHS = ("captions", "image_root", "location")


def _rounded(value):
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(_rounded(value), sort_keys=True).encode()).hexdigest()


def digests(run: Path) -> dict[str, str]:
    """``{part: sha256}`` of a smoke run's pairs, shard schema and metadata, done records, manifest and config."""
    import pyarrow.parquet as pq

    parts: dict[str, str] = {}
    for shard in sorted((run / "shards").glob("shard-*.parquet")):
        file = pq.ParquetFile(shard)
        meta = json.loads(file.schema_arrow.metadata[b"ovseg_mine"])
        meta["source"].pop("location", None)
        parts[f"{shard.stem}.pairs"] = _digest(file.read().to_pylist())
        parts[f"{shard.stem}.schema"] = _digest(file.schema_arrow.remove_metadata().to_string(show_field_metadata=True))
        parts[f"{shard.stem}.metadata"] = _digest(meta)
        parts[f"{shard.stem}.row_groups"] = _digest(file.metadata.num_row_groups)
    for done in sorted((run / "done").glob("shard-*.json")):
        record = json.loads(done.read_text())
        record.pop("stage_s")
        record.pop("sha256")
        parts[f"done/{done.name}"] = _digest(record)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.pop("timings")
    for key in SOURCE_PATHS:
        manifest["source"].pop(key, None)
    for shard in manifest["shards"]:
        shard.pop("sha256")
    parts["manifest.json"] = _digest(manifest)
    parts["config.json"] = _digest(json.loads((run / "config.json").read_text()))
    return parts


def test_a_smoke_run_writes_what_it_wrote_before(smoke_run):
    expected = json.loads(DIGESTS.read_text())
    found = digests(smoke_run)
    assert sorted(found) == sorted(expected)
    assert [part for part in expected if found[part] != expected[part]] == []


if __name__ == "__main__":
    print(json.dumps(digests(Path(sys.argv[1])), indent=1, sort_keys=True))
