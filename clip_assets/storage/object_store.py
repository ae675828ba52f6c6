"""The data directory in an object store (`s3://bucket/prefix`, `gs://...`): a local working copy, the store the truth.

A data directory given as a URL (`CLIP_ASSETS_DATA_DIR=s3://bucket/prefix`) is opened through fsspec
(s3fs for `s3://`; `gs://`, `az://` and the others need their fsspec package installed, and a
missing one is named). Every process works on a local copy of it, a folder under the cache directory
(`CLIP_ASSETS_CACHE_DIR`) named after the URL, which `DataLayout.data_dir` points at, so every reader
and writer of the project keeps working on plain files:

- a write is published: `atomic_files` uploads the finished temp file to the file's key with a single
  PUT (atomic on S3, GCS and Azure: a reader sees the old object or the new one, never a part) before
  it renames the temp file into place, so a failed upload leaves both the store and the local copy as
  they were. No rename ever happens on the store; on a backend whose put is not atomic the object is
  written under a temporary key and copied to its own.
- a read is preceded by a look at the store (`DataLayout` does it for every path it hands out): one
  HEAD per file, one LIST per folder that is listed; the object is downloaded only when the local
  copy differs from it. The local copy's mtime is set from the object (its LastModified second, and
  a sub-second part from its ETag), so every machine's copy of one object has the same size and
  mtime: the notes that record a source file's size and mtime (search rows, index shards) agree
  across machines, and a copy changed locally shows as different. A file gone from the store is
  removed from the local copy. A process that looked at a file less than `recheck_s` seconds ago (or
  wrote it) does not look again, so a warm search costs no requests.
- deleting a file, removing a folder and moving a damaged file aside happen on the store too.

The DuckDB file and the SQLite click stores (review labels, duplicate choices) are not published:
they stay in the local copy only (see docs/object_storage.md).

Credentials are whatever the backend's own client finds (for S3, botocore's chain: AWS_* variables,
AWS_ENDPOINT_URL, the shared config files, the instance or pod role); none are read from the
project's settings. Every request this process makes to a store is counted (`request_counts`), with the
requests of the workers it forks; the URL, the client, the counts and the one-line errors are those of
every store (clip_assets.storage.store_urls).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from clip_assets.storage.store_urls import (
    S3_SCHEMES,
    RequestCounts,
    StoreError,
    check_store_url,
    store_error,
    store_errors,
    store_filesystem,
)

DEFAULT_RECHECK_S = 2.0
# Backends whose single put replaces an object atomically (a reader never sees part of one).
_ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
SETTING = "CLIP_ASSETS_DATA_DIR"

_requests: RequestCounts | None = None
_requests_lock = threading.Lock()


def _counts() -> RequestCounts:
    """This process's counts of requests to data directories in a store: made on first use (a process that
    opens no store makes no shared memory), and shared with the processes forked after that."""
    global _requests
    with _requests_lock:
        if _requests is None:
            _requests = RequestCounts()
        return _requests


def count_request(kind: str, n: int = 1) -> None:
    _counts().add(kind, n)


def request_counts() -> dict[str, int]:
    """Requests this process (and the workers it forked since) made to data directories in a store so far, by
    kind (GET, PUT, HEAD, LIST, DELETE, COPY, OTHER), the kinds with none left out."""
    return {k: n for k, n in _counts().snapshot().items() if n}


def requests_since(before: dict[str, int]) -> dict[str, int]:
    """Requests made since `before` (an earlier `request_counts()`), the kinds with none left out."""
    return _counts().since(before)


def _cache_folder_name(url: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", url.split("://", 1)[1]).strip("-")[:80]
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def _stamp_ns(info: dict[str, Any]) -> int:
    """The mtime every machine gives its local copy of the object `info` describes: its LastModified
    second, and nanoseconds from its ETag, so two versions written within one second differ."""
    modified = info.get("LastModified") or info.get("updated") or info.get("mtime") or info.get("last_modified")
    if isinstance(modified, datetime):
        seconds = int(modified.timestamp())
    elif isinstance(modified, (int, float)):
        seconds = int(modified)
    elif isinstance(modified, str):
        try:
            seconds = int(datetime.fromisoformat(modified).timestamp())
        except ValueError:
            seconds = 0
    else:
        seconds = 0
    version = str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("size")).strip('"')
    return seconds * 1_000_000_000 + int(hashlib.sha256(version.encode()).hexdigest()[:12], 16) % 1_000_000_000


@dataclass
class ObjectStore:
    """One data directory URL, and this process's local copy of it under the cache directory."""

    url: str
    local_root: Path
    recheck_s: float = DEFAULT_RECHECK_S
    fs: Any = field(repr=False, default=None)
    root: str = ""  # the URL as the filesystem names paths (`bucket/prefix`)
    _checked: dict[str, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        try:
            self.url = check_store_url(self.url)  # names the package to install for the scheme
        except ValueError as exc:
            raise StoreError(f"{SETTING}: {exc}") from None
        self.protocol = _URL.match(self.url).group(1).lower()
        self.fs = store_filesystem(self.protocol)
        self.root = type(self.fs)._strip_protocol(self.url).rstrip("/")
        try:  # no credentials, no endpoint: said once, with the URL
            self._counts_requests = _counts().count_sent(self.fs)
        except Exception as exc:
            raise self.error("connecting", exc) from exc
        if self.protocol in S3_SCHEMES:
            try:  # one request when the store is opened: a missing bucket or refused credentials show here
                self.fs.call_s3("head_bucket", Bucket=self.root.split("/", 1)[0])
            except Exception as exc:
                raise self.error("opening the bucket", exc) from exc

    @property
    def counts_own_requests(self) -> bool:
        """Whether the backend's requests are counted as it sends them (S3); else each operation counts as one."""
        return getattr(self, "_counts_requests", False)

    def _op(self, kind: str) -> None:
        if not self.counts_own_requests:
            count_request(kind)

    def error(self, doing: str, exc: BaseException) -> StoreError:
        return store_error(SETTING, self.url, doing, exc)

    def errors(self, doing: str):
        """Requests inside the block: a missing object ends it quietly (gone already); any other failure is
        the one line naming the URL and what to set."""
        return store_errors(SETTING, self.url, doing, missing_ok=True)

    # --- names ---

    def key(self, path: Path) -> str:
        """The store's name of a file of the local copy."""
        relative = Path(path).relative_to(self.local_root).as_posix()
        return self.root if relative == "." else f"{self.root}/{relative}"

    def holds(self, path: Path) -> bool:
        return Path(path).is_relative_to(self.local_root)

    def _fresh(self, key: str) -> bool:
        checked = self._checked.get(key)
        return checked is not None and time.monotonic() - checked < self.recheck_s

    def _mark(self, key: str) -> None:
        self._checked[key] = time.monotonic()

    def _forget(self, prefix: str) -> None:
        for key in [k for k in self._checked if k == prefix or k.startswith(prefix + "/")]:
            del self._checked[key]

    # --- reading ---

    def _head(self, key: str) -> dict[str, Any] | None:
        """The object's size, ETag and LastModified; None when there is none."""
        with self.errors(f"looking at {key}"):
            if self.protocol in S3_SCHEMES:  # one HEAD (fs.info adds a LIST for a missing key)
                bucket, _, name = key.partition("/")
                out = self.fs.call_s3("head_object", Bucket=bucket, Key=name)
                return {"size": out["ContentLength"], "ETag": out.get("ETag"), "LastModified": out.get("LastModified")}
            self._op("HEAD")
            info = self.fs.info(key)
            return info if info.get("type") == "file" else None
        return None

    def _matches(self, path: Path, info: dict[str, Any]) -> bool:
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        return st.st_size == int(info["size"]) and st.st_mtime_ns == _stamp_ns(info)

    def _download(self, key: str, path: Path, info: dict[str, Any]) -> None:
        """Download into a staging folder beside the working copy (same file system), then rename into place."""
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.local_root.with_name(self.local_root.name + ".incoming")
        staging.mkdir(exist_ok=True)
        tmp = staging / f"{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}"
        try:
            self._op("GET")
            self.fs.get_file(key, str(tmp))
            stamp = _stamp_ns(info)
            os.utime(tmp, ns=(stamp, stamp))
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            if isinstance(exc, FileNotFoundError):  # removed since it was listed: gone here too
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                return
            if isinstance(exc, Exception) and not isinstance(exc, OSError):
                raise self.error(f"downloading {key}", exc) from exc
            raise

    def _follow(self, path: Path, info: dict[str, Any] | None) -> None:
        """Make the local copy of `path` what the store holds: downloaded when it differs, removed when gone."""
        if info is None:
            if path.is_file():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        elif not self._matches(path, info):
            self._download(self.key(path), path, info)

    def refresh(self, path: Path) -> None:
        """The local copy of one file brought up to the store's object (one HEAD; a GET when it changed)."""
        key = self.key(path)
        if self._fresh(key):
            return
        self._follow(Path(path), self._head(key))
        self._mark(key)

    def sync_folder(self, folder: Path) -> None:
        """The local copy of one folder's files (not its sub-folders) brought up to the store: one LIST,
        a GET per file that changed, local files gone from the store removed (dot-named ones, the temp files
        of writes in flight, kept)."""
        folder = Path(folder)
        prefix = self.key(folder)
        if self._fresh(prefix + "/"):
            return
        try:
            self._op("LIST")
            listed = self.fs.ls(prefix, detail=True)
        except FileNotFoundError as exc:
            if "bucket" in str(exc).lower():
                raise self.error(f"listing {prefix}", exc) from exc
            listed = []
        except Exception as exc:
            raise self.error(f"listing {prefix}", exc) from exc
        on_store = {}
        for info in listed:
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if info.get("type") == "file" and name:
                on_store[name] = info
        for name, info in on_store.items():
            self._follow(folder / name, info)
            self._mark(f"{prefix}/{name}")
        if folder.is_dir():
            for entry in os.scandir(folder):
                if entry.name not in on_store and entry.is_file() and not entry.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
        self._mark(prefix + "/")

    # --- writing ---

    def publish(self, source: Path, path: Path) -> None:
        """Upload the finished file `source` as `path`'s object, and give `source` the object's stamp
        (so the local copy it becomes matches the store's)."""
        key = self.key(path)
        try:
            if self.protocol in _ATOMIC_PUT:
                self._op("PUT")
                self.fs.put_file(str(source), key)
            else:  # a put that is not atomic goes under a temporary key, then is copied to its own
                staging = f"{key.rsplit('/', 1)[0]}/.clip-assets-upload~{os.getpid()}~{os.urandom(4).hex()}"
                self._op("PUT")
                self.fs.put_file(str(source), staging)
                try:
                    self._op("COPY")
                    self.fs.copy(staging, key)
                finally:
                    self._op("DELETE")
                    self.fs.rm_file(staging)
            info = self._head(key)
        except OSError as exc:
            if isinstance(exc, (FileNotFoundError, PermissionError)):
                raise self.error(f"uploading {key}", exc) from exc
            raise
        except StoreError:
            raise
        except Exception as exc:
            raise self.error(f"uploading {key}", exc) from exc
        if info is None:
            raise StoreError(f"{SETTING}={self.url}: {key} was uploaded but is not there")
        stamp = _stamp_ns(info)
        os.utime(source, ns=(stamp, stamp))
        self._mark(key)

    def remove(self, path: Path) -> None:
        """Delete one file's object (nothing when there is none)."""
        key = self.key(path)
        with self.errors(f"deleting {key}"):
            self._op("DELETE")
            self.fs.rm_file(key)
        self._mark(key)

    def remove_tree(self, folder: Path, keep: re.Pattern[str] | None = None) -> None:
        """Delete every object under a folder (those whose name matches `keep` stay)."""
        prefix = self.key(folder)
        with self.errors(f"deleting {prefix}"):
            self._op("LIST")
            names = self.fs.find(prefix)
            doomed = [n for n in names if keep is None or not keep.search(n.rsplit("/", 1)[-1])]
            if doomed:
                self._op("DELETE")
                self.fs.rm(doomed)
        self._forget(prefix)

    def move(self, source: Path, target: Path) -> None:
        """Move an object to another name (a copy, then a delete: stores have no rename)."""
        old, new = self.key(source), self.key(target)
        with self.errors(f"moving {old}"):  # nothing to move: nothing more to do
            self._op("COPY")
            self.fs.copy(old, new)
            self._op("DELETE")
            self.fs.rm_file(old)
            self._forget(old)
            self._forget(new)


_stores: dict[tuple[str, Path], ObjectStore] = {}
_stores_lock = threading.Lock()
_cache_dir: Path | None = None
_recheck_s = DEFAULT_RECHECK_S


def default_cache_dir() -> Path:
    import tempfile

    return Path(tempfile.gettempdir()) / "clip-assets-cache"


def configure_cache(cache_dir: Path | None, recheck_s: float = DEFAULT_RECHECK_S) -> None:
    """Where this process keeps its local copies of data directories in a store, and how long a look
    at the store stays good (clip_assets.process applies the settings here)."""
    global _cache_dir, _recheck_s
    _cache_dir, _recheck_s = (Path(cache_dir) if cache_dir is not None else None), recheck_s


def open_store(url: str, cache_dir: Path | None = None) -> ObjectStore:
    """The store of a data directory URL with this process's local copy of it (one per URL and cache folder)."""
    cache = Path(cache_dir or _cache_dir or default_cache_dir()).absolute()
    local_root = cache / _cache_folder_name(url.rstrip("/"))
    with _stores_lock:
        store = _stores.get((url, local_root))
        if store is None:
            local_root.mkdir(parents=True, exist_ok=True)
            store = ObjectStore(url.rstrip("/"), local_root, _recheck_s)
            _stores[(url, local_root)] = store
        return store


def store_for(path: Path | str) -> ObjectStore | None:
    """The store whose local copy holds `path`; None for a plain local file (the usual case: no store open)."""
    if not _stores:
        return None
    path = Path(path)
    for store in list(_stores.values()):
        if store.holds(path):
            return store
    return None


def forget_stores() -> None:
    """Close every store of this process (tests: the next open starts from a new client)."""
    with _stores_lock:
        _stores.clear()
