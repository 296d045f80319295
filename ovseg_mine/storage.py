"""Paths and URIs: where a run reads its inputs and writes its outputs.

Every location the project reads or writes (captions files, image roots, tar shards, run folders, finetune
outputs) is a local path or a URI (``file://``, ``s3://``, ``gs://``, or any other fsspec protocol), resolved by
:func:`resolve` to a :class:`Location`: a ``pyarrow.fs.FileSystem`` and a path inside it. pyarrow's own file
systems serve local disks, S3 and GCS (the ones Ray Data reads natively); other protocols go through fsspec
(``pyarrow.fs.PyFileSystem(FSSpecHandler(...))``). Credentials come from each file system's standard environment
and configuration (for S3: ``AWS_ACCESS_KEY_ID``..., ``~/.aws/``, ``AWS_ENDPOINT_URL`` for S3-compatible servers);
they are never part of a location and never printed.

Writing follows one rule everywhere: a file is either absent or whole. On a local disk a write goes to a
``.tmp`` sibling, is fsynced and renamed over the target (:meth:`Location.write_bytes`); an object store has no
rename, but an object becomes visible only once its upload is complete, so a write is one object. What must
be committed in steps (a shard, then its done marker) is built on that by :mod:`ovseg_mine.shards`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow.fs as pafs

#: URI schemes served by pyarrow's own file systems.
PYARROW_SCHEMES = ("file", "s3", "gs", "gcs")


class StorageError(OSError):
    """A location that cannot be resolved or read; the message names it (never its credentials)."""


def _scheme(location: str) -> str | None:
    head, sep, _ = location.partition("://")
    return head.lower() if sep and head.isidentifier() else None


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


def redact(text: str) -> str:
    """``text`` with the credentials of any URI in it (``s3://KEY:SECRET@bucket``) replaced by ``***``."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


@dataclass(frozen=True)
class Location:
    """A file or folder on some file system.

    Attributes:
        fs: the pyarrow file system that holds it.
        path: its path inside ``fs`` (for local files an absolute POSIX path; for object stores
            ``bucket/key``), without a trailing slash.
        scheme: ``""`` for the local disk, else the URI scheme (``s3``, ``gs``, ``memory``...).
    """

    fs: "pafs.FileSystem"
    path: str
    scheme: str = ""

    @property
    def uri(self) -> str:
        """How a user names it: the absolute local path, or ``scheme://path``."""
        return f"{self.scheme}://{self.path}" if self.scheme else self.path

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        """The local path, so that a local Location works wherever a path does (``open``, pyarrow, ``Path``).

        Raises:
            TypeError: not on the local disk (use :attr:`fs` and :attr:`path`).
        """
        if not self.is_local:
            raise TypeError(f"{self.uri} is not a local path")
        return self.path

    @property
    def is_local(self) -> bool:
        """True for the local disk (plain paths and ``file://`` URIs)."""
        import pyarrow.fs as pafs

        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path | None:
        """The local ``Path`` when :attr:`is_local`, else None."""
        return Path(self.path) if self.is_local else None

    @property
    def name(self) -> str:
        """The last path component (``shard-00000.parquet``)."""
        return posixpath.basename(self.path)

    def join(self, *parts: str) -> "Location":
        """The location ``parts`` below this one (POSIX separators; ``..`` is not resolved)."""
        return Location(self.fs, posixpath.join(self.path, *parts), self.scheme)

    @property
    def parent(self) -> "Location":
        """The folder that holds this location."""
        return Location(self.fs, posixpath.dirname(self.path), self.scheme)

    def _info(self) -> "pafs.FileInfo":
        try:
            return self.fs.get_file_info(self.path)
        except OSError as exc:
            raise StorageError(f"cannot reach {self.uri}: {first_line(exc)}") from exc

    def exists(self) -> bool:
        """True when a file or folder is there."""
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        """True when a file (an object) is there."""
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """True when a folder is there (on object stores: a prefix with objects under it)."""
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def size(self) -> int:
        """Size in bytes of the file.

        Raises:
            StorageError: no file there.
        """
        info = self._info()
        if info.size is None:
            raise StorageError(f"{self.uri} is not a file")
        return int(info.size)

    def open_input(self) -> IO[bytes]:
        """A seekable binary file object for reading (close it, or use it in a ``with``).

        Raises:
            StorageError: not found or not readable.
        """
        try:
            return self.fs.open_input_file(self.path)
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot open {self.uri}: {first_line(exc)}") from exc

    def read_bytes(self) -> bytes:
        """The whole file's bytes. Raises StorageError as :meth:`open_input`."""
        with self.open_input() as handle:
            return handle.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        """The whole file decoded as text. Raises StorageError as :meth:`open_input`, UnicodeDecodeError."""
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file, so that readers see the old content or the new, never a part.

        Local disk: to ``NAME.tmp`` next to it, fsync, rename over it (parent folders are created); a write that
        fails (a full disk) removes its ``NAME.tmp``. Object store: one object, which becomes visible only when its
        upload completes.

        Raises:
            StorageError: not writable (the message names the location and the cause, e.g. ``[Errno 28] No space
                left on device``).
        """
        tmp = None
        try:
            if self.is_local:
                target = Path(self.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, target)
            else:
                with self.fs.open_output_stream(self.path) as handle:
                    handle.write(data)
        except (OSError, ValueError) as exc:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise StorageError(f"cannot write {self.uri}: {first_line(exc)}") from exc

    def write_via(self, write: Callable[[str], None]) -> None:
        """Write the file with ``write(local_path)`` (a writer that only takes a path: ``torch.save``, safetensors),
        whole as :meth:`write_bytes`: on a local disk to ``NAME.tmp``, fsynced and renamed; for an object store to a
        local temporary file, then uploaded as one object (streamed, not held in memory).

        Raises:
            StorageError: not writable. What ``write`` raises passes through.
        """
        import tempfile

        if self.is_local:
            target = Path(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            try:
                write(str(tmp))
            except BaseException:  # a failed or interrupted write (a full disk) leaves no NAME.tmp behind
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            try:
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
                os.replace(tmp, target)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise StorageError(f"cannot write {self.uri}: {first_line(exc)}") from exc
            return
        with tempfile.TemporaryDirectory(prefix="ovseg-mine-") as folder:
            local = os.path.join(folder, self.name)
            write(local)
            _copy(resolve(local), self)

    @contextlib.contextmanager
    def local_file(self) -> Iterator[str]:
        """A local path holding this file's bytes while the block runs: the file itself on a local disk, a
        temporary copy (downloaded, streamed) of an object, deleted afterwards.

        Raises:
            StorageError: not found or not readable.
        """
        if self.is_local:
            if not self.is_file():
                raise StorageError(f"{self.uri} is not a file")
            yield self.path
            return
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ovseg-mine-") as folder:
            local = os.path.join(folder, self.name)
            _copy(self, resolve(local))
            yield local

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        """:meth:`write_bytes` of ``text`` encoded. Raises StorageError."""
        self.write_bytes(text.encode(encoding))

    def delete(self) -> bool:
        """Delete the file if it is there; returns whether it was.

        Raises:
            StorageError: it is there and cannot be deleted.
        """
        import pyarrow.fs as pafs

        try:
            if self._info().type == pafs.FileType.NotFound:
                return False
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot delete {self.uri}: {first_line(exc)}") from exc
        return True

    def delete_tree(self) -> None:
        """Delete this folder and everything under it (nothing happens if it is not there).

        Raises:
            StorageError: it cannot be deleted.
        """
        if not self.is_dir():
            return
        try:
            self.fs.delete_dir(self.path)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot delete {self.uri}: {first_line(exc)}") from exc

    def makedirs(self) -> None:
        """Create this folder and its parents on a local disk; nothing to do on an object store (prefixes exist
        once objects are under them). Raises StorageError."""
        if not self.is_local:
            return
        try:
            Path(self.path).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the folder {self.uri}: {first_line(exc)}") from exc

    def list_files(self, *, recursive: bool = False) -> list["Location"]:
        """The files under this folder, sorted by path (folders themselves are not listed).

        Raises:
            StorageError: not a folder, or not reachable.
        """
        import pyarrow.fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive))
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot list {self.uri}: {first_line(exc)}") from exc
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
        return [self.join(posixpath.relpath(p, self.path)) for p in files]


def _copy(source: Location, target: Location) -> None:
    """Stream ``source``'s bytes into ``target`` (pyarrow's copy: chunked, never the whole file in memory)."""
    import pyarrow.fs as pafs

    try:
        pafs.copy_files(source.path, target.path, source_filesystem=source.fs, destination_filesystem=target.fs)
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot copy {source.uri} to {target.uri}: {first_line(exc)}") from exc


def sha256_file(location: "str | os.PathLike[str] | Location") -> str:
    """Hex sha256 of a file's bytes (a local path, a URI or a :class:`Location`), read in 4 MiB chunks.

    Raises:
        StorageError: not found or not readable.
    """
    import hashlib

    digest = hashlib.sha256()
    with resolve(location).open_input() as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most ``limit`` characters (its type name if it is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def resolve(location: "str | os.PathLike[str] | Location") -> Location:
    """Resolve a local path or a URI to a :class:`Location`.

    Args:
        location: ``runs/coco``, ``/data/coco``, ``file:///data/coco``, ``s3://bucket/coco``, ``gs://bucket/coco``,
            or another fsspec URI (``memory://``, ``hf://``...), or a Location (returned as is).

    Raises:
        StorageError: an unknown scheme, or a file system that cannot be set up (missing package, bad URI).
    """
    if isinstance(location, Location):
        return location
    text = os.fspath(location)
    scheme = _scheme(text)
    if scheme is None:
        import pyarrow.fs as pafs

        path = Path(text).expanduser().absolute().as_posix()
        return Location(pafs.LocalFileSystem(), path.rstrip("/") or "/")
    try:
        if scheme == "file":
            import pyarrow.fs as pafs

            fs, path = pafs.FileSystem.from_uri(text)
        elif scheme in PYARROW_SCHEMES:
            from urllib.parse import unquote, urlsplit

            parts = urlsplit(text)
            root = f"{scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else "")
            fs = _pyarrow_fs(root, _environment_key(scheme))
            path = parts.netloc.rpartition("@")[2] + unquote(parts.path)
        else:
            import fsspec
            import pyarrow.fs as pafs

            spec_fs, path = fsspec.core.url_to_fs(text)
            fs = pafs.PyFileSystem(pafs.FSSpecHandler(spec_fs))
    except (OSError, ValueError, ImportError) as exc:
        raise StorageError(f"cannot open the file system of {redact(text)}: {first_line(exc)}") from exc
    if scheme == "file":
        return Location(fs, path.rstrip("/") or "/")
    return Location(fs, path.rstrip("/"), scheme)


#: Environment variables that configure each pyarrow file system (a changed value gives a new file system).
_ENVIRONMENT = {"s3": ("AWS_",), "gs": ("GOOGLE_", "GCS_", "STORAGE_EMULATOR_HOST"), "gcs": ("GOOGLE_", "GCS_")}


def _environment_key(scheme: str) -> tuple[tuple[str, str], ...]:
    prefixes = _ENVIRONMENT.get(scheme, ())
    return tuple(sorted((k, v) for k, v in os.environ.items() if prefixes and k.startswith(prefixes)))


@functools.lru_cache(maxsize=64)
def _pyarrow_fs(root: str, environment: tuple[tuple[str, str], ...]) -> "pafs.FileSystem":
    """pyarrow's file system for ``scheme://bucket``, made once per configuration (an S3 file system looks up its
    bucket's region when it is made). ``environment`` is only part of the cache key."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(root)[0]
