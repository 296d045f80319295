"""Locations: local paths and URIs resolve to one interface (pyarrow file systems; fsspec for other schemes)."""

from __future__ import annotations

import pytest

from ovseg_mine.storage import Location, StorageError, resolve


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_local_paths_and_file_uris_read_and_list(tmp_path, as_uri):
    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "images" / "a.jpg").write_bytes(b"abc")
    (tmp_path / "images" / "sub" / "b.jpg").write_bytes(b"defg")
    root = resolve(f"file://{tmp_path}/images" if as_uri else tmp_path / "images")
    assert root.is_local and root.is_dir() and not root.is_file()
    assert root.uri == str(tmp_path / "images") and root.local_path == tmp_path / "images"
    assert root.join("a.jpg").read_bytes() == b"abc" and root.join("sub", "b.jpg").size() == 4
    assert [loc.name for loc in root.list_files()] == ["a.jpg"]
    assert [loc.path for loc in root.list_files(recursive=True)] == [
        f"{tmp_path}/images/a.jpg",
        f"{tmp_path}/images/sub/b.jpg",
    ]
    assert root.join("sub", "b.jpg").parent.path == f"{tmp_path}/images/sub"
    assert not root.join("missing.jpg").exists()
    with pytest.raises(StorageError, match="missing.jpg"):
        root.join("missing.jpg").read_bytes()


def test_other_schemes_go_through_fsspec():
    import fsspec

    fsspec.filesystem("memory").pipe("/bucket/run/x.json", b"{}")
    loc = resolve("memory://bucket/run")
    assert isinstance(loc, Location) and not loc.is_local and loc.scheme == "memory"
    assert loc.join("x.json").read_text() == "{}"
    assert loc.join("x.json").uri == "memory:///bucket/run/x.json"
    assert [f.name for f in loc.list_files()] == ["x.json"]


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(StorageError, match="nosuchproto://x"):
        resolve("nosuchproto://x/y")
