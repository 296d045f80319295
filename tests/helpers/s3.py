"""A local S3-compatible server (moto) for object-storage tests, and uploads to it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers.cli import free_port


def upload(folder: Path, uri: str) -> str:
    """Copy every file under the local ``folder`` to the same relative keys under ``uri``; returns ``uri``."""
    from ovseg_mine.storage import resolve

    target = resolve(uri)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        target.join(path.relative_to(folder).as_posix()).write_bytes(path.read_bytes())
    return uri


class MotoServer:
    """moto's S3-compatible server in its own process, bound to 127.0.0.1 (no traffic leaves the machine).

    ``env`` holds what a client needs (endpoint, region and dummy credentials, the standard AWS variables);
    :meth:`bucket` creates a bucket and returns its ``s3://`` URI.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "test-key-id",
            "AWS_SECRET_ACCESS_KEY": "test-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start on 127.0.0.1:{self.port}") from None
                time.sleep(0.1)

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (lowercase, 3-63 characters) and return ``s3://name``."""
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            access_key=self.env["AWS_ACCESS_KEY_ID"],
            secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
            endpoint_override=self.endpoint,
            region=self.env["AWS_DEFAULT_REGION"],
            allow_bucket_creation=True,
        )
        fs.create_dir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
