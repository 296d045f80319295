"""Locations: local paths and URIs resolve to one interface (pyarrow file systems; fsspec for other schemes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ovseg_mine.storage import Location, StorageError, redact, resolve


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


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A folder to write into: a local path, or a bucket on a local moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3") + "/root"


def test_write_read_list_and_delete_on_disks_and_object_stores(root):
    loc = resolve(root)
    run = loc.join("run")
    run.join("shards", "a.json").write_text('{"a": 1}')
    run.join("b.bin").write_bytes(b"\x00\x01")
    run.join("b.bin").write_bytes(b"\x02")  # replaced whole
    assert run.is_dir() and run.join("b.bin").is_file() and run.join("b.bin").read_bytes() == b"\x02"
    assert [f.name for f in run.list_files()] == ["b.bin"]
    assert [f.path for f in run.list_files(recursive=True)] == [f"{run.path}/b.bin", f"{run.path}/shards/a.json"]
    assert not any(f.name.endswith(".tmp") for f in run.list_files(recursive=True))
    assert run.join("b.bin").delete() and not run.join("b.bin").exists() and not run.join("b.bin").delete()
    run.delete_tree()
    assert not run.exists() and not run.join("shards", "a.json").exists()
    run.delete_tree()  # nothing there: nothing to do


def test_s3_location_takes_the_endpoint_and_credentials_from_the_environment(s3, moto_server):
    loc = resolve(f"{s3}/data/x.txt")
    assert loc.scheme == "s3" and loc.uri == f"{s3}/data/x.txt" and not loc.is_local
    loc.write_text("hello")
    assert resolve(f"{s3}/data").list_files() == [loc]
    with pytest.raises(TypeError, match="not a local path"):
        open(loc)
    # The credentials come from the environment, never from (or into) a location or a message.
    with pytest.raises(StorageError) as info:
        resolve(f"{s3}/data/missing.txt").read_bytes()
    assert "missing.txt" in str(info.value) and moto_server.env["AWS_SECRET_ACCESS_KEY"] not in str(info.value)


def test_credentials_in_a_uri_are_never_repeated():
    assert redact("cannot open s3://AKIA:SECRET@bucket/x") == "cannot open s3://***@bucket/x"
    assert redact("s3://bucket/x and /local/path") == "s3://bucket/x and /local/path"


def test_a_local_location_is_a_path(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    loc = resolve(tmp_path / "x.txt")
    with open(loc) as handle:
        assert handle.read() == "x"
    assert Path(loc) == tmp_path / "x.txt"
