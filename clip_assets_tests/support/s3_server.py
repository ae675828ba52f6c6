"""An S3-compatible server on loopback for the tests that put the data directory or the image root in a bucket.

moto's `ThreadedMotoServer` (moto in server mode, as s3fs's and pyarrow's own test suites use) is a real
HTTP server speaking the S3 API: clients reach it through botocore as they would reach AWS, with
credentials and the endpoint from the environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), and
nothing in the code under test knows it is not AWS. One server serves the whole test session, on a
free port of 127.0.0.1; each test gets a bucket of its own (`s3_store`), so tests never see each
other's objects.

    def test_something(s3_store):
        settings = Settings(data_dir=s3_store.url("data"), ...)
        assert s3_store.keys("data/embeddings/")
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import s3fs
from moto.server import ThreadedMotoServer

from clip_assets.storage.store_root import StoreRoot

REGION = "us-east-1"
ACCESS_KEY = "clip-assets-test-key"
SECRET_KEY = "clip-assets-test-secret"
_buckets = itertools.count(1)


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>

    def environment(self) -> dict[str, str]:
        """What a process sets to reach this server as it would reach AWS (botocore reads each of these)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }


@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on the loopback server, reached with the environment the fixture set."""

    server: S3Server
    bucket: str

    def url(self, prefix: str = "") -> str:
        """`s3://<bucket>/<prefix>` (the bucket's root without a prefix)."""
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def filesystem(self) -> s3fs.S3FileSystem:
        """A client of the test's own (no listings cache), for looking at the bucket from outside the code under test."""
        return s3fs.S3FileSystem(
            endpoint_url=self.server.endpoint,
            key=ACCESS_KEY,
            secret=SECRET_KEY,
            skip_instance_cache=True,
            use_listings_cache=False,
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every object's key under `prefix` (relative to the bucket), sorted."""
        fs = self.filesystem()
        root = f"{self.bucket}/{prefix}".rstrip("/")
        if not fs.exists(root):
            return []
        return sorted(path.removeprefix(f"{self.bucket}/") for path in fs.find(root))


def upload(local: Path, s3_store: S3Bucket, prefix: str) -> StoreRoot:
    """Every file under the local folder put under `prefix` in the test's bucket (the same relative paths);
    the image root that names it."""
    fs = s3_store.filesystem()
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.pipe(f"{s3_store.bucket}/{prefix}/{path.relative_to(local).as_posix()}", path.read_bytes())
    return StoreRoot(s3_store.url(prefix))


def start() -> tuple[ThreadedMotoServer, S3Server]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request in the tests' output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, S3Server(f"http://{host}:{port}")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One S3-compatible server on a free loopback port for the whole session."""
    server, address = start()
    yield address
    server.stop()


@pytest.fixture
def s3_store(s3_server: S3Server, monkeypatch) -> S3Bucket:
    """A fresh, empty bucket on the session's loopback S3 server, with the AWS_* variables set to reach it
    (and no profile or instance role from this machine in the way)."""
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = S3Bucket(s3_server, f"clip-assets-test-{os.getpid()}-{next(_buckets)}")
    bucket.filesystem().mkdir(bucket.bucket)
    return bucket
