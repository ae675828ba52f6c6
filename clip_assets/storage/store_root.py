"""An image root in an object store (`s3://bucket/prefix`, or any fsspec scheme whose package is installed).

The batches are the direct "folders" (common prefixes) under the root's prefix; a batch's objects are
listed in one paginated LIST pass, and each object is read with one GET. Credentials, the client, the
request counts and the one-line errors are those of every store (clip_assets.storage.store_urls).
Listings are never cached: a re-scan sees the store as it is.

Every request goes through one client per process (created on first use, again after a fork, so
DataLoader workers have their own), and is counted in `RequestCounts`, which forked workers share
with the process that made the root: a benchmark reads how many LISTs and GETs a batch cost.

`image_root_from` decides, once, what a CLIP_ASSETS_IMAGE_ROOT value is: a plain path or a `file://`
URL is a local folder (a Path, handled exactly as before), anything else with a scheme a StoreRoot.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from clip_assets.storage.store_urls import (
    RequestCounts,
    check_store_url,
    is_store_url,
    local_path,
    store_errors,
    store_filesystem,
)

# GETs one process has in flight at once while it reads a share of images: on a store with tens of
# milliseconds per request, one at a time would leave the decoder waiting.
CONCURRENT_GETS = 8

# Store options per scheme: no listings cache (a re-scan must see what is there now); for S3, one GET per
# object (s3fs otherwise asks for the size first, a HEAD, to split large objects into ranged GETs).
_OPTIONS: dict[str, dict[str, Any]] = {"s3": {"max_concurrency": 1}, "s3a": {"max_concurrency": 1}}


@dataclass(frozen=True)
class StoredObject:
    relative_path: str  # under the image root, posix, as a local file's would be
    size: int
    mtime: float | None  # LastModified, in seconds since the epoch
    etag: str | None


def _mtime(info: dict) -> float | None:
    for key in ("LastModified", "mtime", "updated", "last_modified"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        with contextlib.suppress(TypeError, ValueError):
            return float(value)
    return None


def _walk_order(relative_path: str) -> tuple:
    """The order os.walk lists a local batch in: a folder's files (sorted), then its sub-folders' (sorted)."""
    *folders, name = relative_path.split("/")
    return (*((1, f) for f in folders), (0, name))


class StoreRoot:
    """An image root in an object store. Picklable: a DataLoader worker or a process of its own makes its own client."""

    def __init__(self, url: str):
        self.url = check_store_url(url)
        parts = urlsplit(self.url)
        self.protocol = parts.scheme
        self.path = f"{parts.netloc}{parts.path}".rstrip("/")  # bucket/prefix, as fsspec names it
        self.bucket = parts.netloc
        self.requests = RequestCounts()
        self._fs = None
        self._pid = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_pid = None
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"StoreRoot({self.url!r})"

    def __getstate__(self):
        return {"url": self.url, "requests": self.requests}

    def __setstate__(self, state):
        self.__init__(state["url"])
        self.requests = state["requests"]

    # --- the client -----------------------------------------------------------------------------------

    @property
    def fs(self):
        """This process's client for the store (created on first use, and again in a forked child)."""
        with self._lock:
            if self._fs is None or self._pid != os.getpid():
                with self.errors("connecting"):
                    fs = store_filesystem(self.protocol, **_OPTIONS.get(self.protocol, {}))
                    self._counted_by_hook = self.requests.count_sent(fs)
                self._fs, self._pid = fs, os.getpid()
            return self._fs

    def _count(self, kind: str) -> None:
        """Count one operation as one request, for a store whose client's own requests are not counted."""
        if not getattr(self, "_counted_by_hook", False):
            self.requests.add(kind)

    def errors(self, doing: str):
        """The store's errors about the root as a whole (credentials, bucket, endpoint) as one line naming the
        URL and what to set."""
        return store_errors("CLIP_ASSETS_IMAGE_ROOT", self.url, doing)

    def _full(self, relative: str) -> str:
        return f"{self.path}/{relative}"

    # --- listing --------------------------------------------------------------------------------------

    def list_batches(self) -> list[str]:
        """The direct "folders" under the root, dot-names aside, sorted: one LIST with a delimiter."""
        fs = self.fs
        with self.errors("listing its batches"):
            self._count("LIST")
            try:
                found = fs.ls(self.path, detail=True, refresh=True)
            except FileNotFoundError:
                if not fs.exists(self.bucket):
                    raise
                return []  # a prefix with nothing under it yet
        names = (info["name"].rstrip("/").rsplit("/", 1)[-1] for info in found if info.get("type") == "directory")
        return sorted(n for n in names if n and not n.startswith("."))

    def batch_exists(self, batch: str) -> bool:
        return batch in self.list_batches()

    def list_objects(self, batch: str) -> list[StoredObject]:
        """Every object under the batch's prefix (folder markers and dot-named parts aside), in the order a
        local batch's files are listed: one LIST pass, paginated by the store."""
        fs = self.fs
        with self.errors(f"listing the batch {batch}"):
            self._count("LIST")
            try:
                found = fs.find(self._full(batch), detail=True)
            except FileNotFoundError:
                found = {}
        objects = []
        for name, info in found.items():
            if info.get("type") == "directory" or name.endswith("/"):
                continue
            relative = name.removeprefix(self.path + "/")
            if any(part.startswith(".") or not part for part in relative.split("/")):
                continue  # dotfiles and dot-folders aside, as on a local disk; empty parts are folder markers
            etag = info.get("ETag") or info.get("etag")
            objects.append(
                StoredObject(
                    relative,
                    int(info.get("size") or 0),
                    _mtime(info),
                    etag.strip('"') if isinstance(etag, str) else None,
                )
            )
        return sorted(objects, key=lambda o: _walk_order(o.relative_path))

    # --- reading --------------------------------------------------------------------------------------

    def read_bytes(self, relative: str) -> bytes:
        """One object's bytes (one GET); an object that is gone says so with its URL."""
        fs = self.fs
        self._count("GET")
        try:
            return fs.cat_file(self._full(relative))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.url}/{relative}: no such object (deleted or renamed since the batch was listed)"
            ) from None

    def stat(self, relative: str) -> tuple[int, float | None]:
        """(size, mtime) of one object, as its manifest row has them (one HEAD)."""
        fs = self.fs
        self._count("HEAD")
        info = fs.info(self._full(relative))
        return int(info.get("size") or 0), _mtime(info)

    def read_many(self, relatives: list[str], timeout_s: float | None) -> Iterator[bytes | BaseException]:
        """Each object's bytes, or the exception reading it raised, in order, CONCURRENT_GETS at a time.

        Waiting for one object stops after `timeout_s` (a FileTimeout in its place); its GET is left to
        finish in the background.
        """
        from clip_assets.embedding.decode_faults import FileTimeout  # not at the top: it imports torch

        pool = self._reader_pool()
        futures = [pool.submit(self.read_bytes, r) for r in relatives]
        try:
            for future in futures:
                try:
                    yield future.result(timeout=timeout_s or None)
                except concurrent.futures.TimeoutError:
                    yield FileTimeout(f"gave up after {timeout_s:g} s (object too slow to read)")
                except Exception as exc:
                    yield exc
        finally:
            for future in futures:
                future.cancel()

    def _reader_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    CONCURRENT_GETS, thread_name_prefix="clip-assets-get"
                )
                self._pool_pid = os.getpid()
            return self._pool


def image_root_from(value: str | Path | StoreRoot) -> Path | StoreRoot:
    """What a CLIP_ASSETS_IMAGE_ROOT value names: a local folder (Path) or a root in an object store."""
    if isinstance(value, (Path, StoreRoot)):
        return value
    return StoreRoot(value) if is_store_url(value) else local_path(value)


def read_file_bytes(image_root: Path | StoreRoot, relative: str) -> bytes:
    """The bytes of a file under the image root, local or in a store: the one place an image is read by path."""
    if isinstance(image_root, StoreRoot):
        return image_root.read_bytes(relative)
    return (image_root / relative).read_bytes()


def file_stat(image_root: Path | StoreRoot, relative: str) -> tuple[int, float | None]:
    """(size, mtime) of a file under the image root, as its manifest row has them: a `stat`, or a HEAD."""
    if isinstance(image_root, StoreRoot):
        return image_root.stat(relative)
    st = (image_root / relative).stat()
    return st.st_size, st.st_mtime


def file_source(image_root: Path | StoreRoot, relative: str) -> Path | Callable[[], bytes]:
    """What Pillow opens for a file under the image root: the local path, or a function that reads the
    object's bytes (called where the caller catches a failed read, as it does an unreadable file)."""
    if isinstance(image_root, StoreRoot):
        return lambda: image_root.read_bytes(relative)
    return image_root / relative
