"""An object-store URL (`s3://bucket/prefix`, or any fsspec scheme whose package is installed): what both
places a setting may name a store share, the image root (store_root) and the data directory (object_store).

- what a setting's value is: a plain path or a `file://` URL is a local folder, anything else with a
  scheme a store, once its fsspec package is known to be installed (`path_or_store_url`);
- the store's client: fsspec's filesystem with no listings cache, never shared between users
  (`store_filesystem`), and its requests counted (`RequestCounts`);
- what a failure says: one line naming the setting, its URL and what to set (`store_error`).

Credentials come from where the store's own client looks (for S3: the AWS_* variables, AWS_ENDPOINT_URL,
a profile, an instance role), never from this project's files.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CREDENTIALS_HINT = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run with an instance role; "
    "AWS_ENDPOINT_URL for an S3-compatible server",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS, or run with a service account",
    "gcs": "set GOOGLE_APPLICATION_CREDENTIALS, or run with a service account",
}
CREDENTIALS_HINT["s3a"] = CREDENTIALS_HINT["s3"]
S3_SCHEMES = ("s3", "s3a")
_REFUSED = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")


class StoreError(RuntimeError):
    """A store a setting names cannot be reached or used; the message is one line naming the setting, its URL
    and what to set. Not an OSError: a handler of a local file's errors must not take a store that is down
    for a missing, damaged or read-only file."""


def is_store_url(value: str | Path) -> bool:
    """A URL with a scheme other than file:// (a plain path, or file://, is a local folder)."""
    if isinstance(value, Path):
        return False
    scheme = urlsplit(str(value)).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter: a Windows drive


def local_path(value: str | Path) -> Path:
    """A plain path or a file:// URL as a Path."""
    text = str(value)
    return Path(urlsplit(text).path) if text.startswith("file://") else Path(text)


def check_store_url(url: str) -> str:
    """The URL without a trailing slash, once its scheme's package is known to be installed; else a ValueError
    that names the package to install."""
    from fsspec.registry import get_filesystem_class, known_implementations

    parts = urlsplit(url)
    if not parts.netloc:
        raise ValueError(f"{url}: name the bucket, as in {parts.scheme}://bucket/prefix")
    try:
        get_filesystem_class(parts.scheme)
    except ImportError:
        known = known_implementations.get(parts.scheme, {})
        package = known.get("class", "").split(".")[0] or f"the fsspec backend for {parts.scheme}://"
        raise ValueError(
            f"{url}: reading {parts.scheme}:// needs the {package} package, which is not installed (uv add {package})"
        ) from None
    except ValueError:
        raise ValueError(f"{url}: fsspec knows no store with the scheme {parts.scheme}://") from None
    return url.rstrip("/")


def path_or_store_url(value: Any) -> Any:
    """A setting's value that names a folder or a store: a plain path or file:// URL is a local folder (a Path);
    any other URL is kept as text, once its store's package is known to be installed."""
    if isinstance(value, Path) or not isinstance(value, str):
        return value
    return check_store_url(value) if is_store_url(value) else local_path(value)


def store_error(setting: str, url: str, doing: str, exc: BaseException) -> StoreError:
    """The one line a failed request to a store becomes: the setting and its URL, what was being done, what
    went wrong and what to set."""
    parts = urlsplit(url)
    hint = CREDENTIALS_HINT.get(parts.scheme, "set the credentials its client reads")
    name = type(exc).__name__
    text = " ".join(str(exc).split())[:200] or name
    if name in ("NoCredentialsError", "PartialCredentialsError") or "credentials" in text.lower():
        why = f"no credentials were found ({hint})"
    elif isinstance(exc, PermissionError) or any(word in text for word in _REFUSED):
        why = f"the credentials found were refused ({text}; {hint}; and check that they may use the bucket)"
    elif (
        isinstance(exc, FileNotFoundError)
        or "NoSuchBucket" in text
        or ("bucket" in text.lower() and "does not exist" in text)
    ):
        why = (
            f"the bucket {parts.netloc} does not exist or these credentials cannot see it (create it, or set "
            f"{setting} to {parts.scheme}://<bucket>/<prefix> naming one that does; {hint})"
        )
    elif parts.scheme in S3_SCHEMES:
        why = f"{name}: {text} (check the URL, AWS_ENDPOINT_URL and the network)"
    else:
        why = f"{name}: {text}"
    return StoreError(f"{setting}={url}: {doing} failed: {why}.")


@contextlib.contextmanager
def store_errors(setting: str, url: str, doing: str, missing_ok: bool = False) -> Iterator[None]:
    """Requests to the store inside the block: what fails comes out as `store_error`'s one line; with
    `missing_ok`, a missing object ends the block and nothing more (a delete of what is gone already)."""
    try:
        yield
    except StoreError:
        raise
    except FileNotFoundError as exc:
        if not missing_ok:
            raise store_error(setting, url, doing, exc) from exc
    except Exception as exc:
        raise store_error(setting, url, doing, exc) from exc


def store_filesystem(protocol: str, **options: Any):
    """A new fsspec filesystem for the scheme (never one another user holds), with no listings cache: a
    listing must see the store as it is now. `options` are the backend's own."""
    import fsspec  # deferred: only a setting that names a store needs it

    return fsspec.filesystem(protocol, skip_instance_cache=True, use_listings_cache=False, **options)


# What each S3 API call is, in the words of the request counts.
KIND_NAMES = ("LIST", "GET", "HEAD", "PUT", "DELETE", "COPY", "OTHER")
S3_KINDS = {
    "ListObjectsV2": "LIST",
    "ListObjects": "LIST",
    "GetObject": "GET",
    "HeadObject": "HEAD",
    "HeadBucket": "HEAD",
    "PutObject": "PUT",
    "CreateMultipartUpload": "PUT",
    "UploadPart": "PUT",
    "CompleteMultipartUpload": "PUT",
    "DeleteObject": "DELETE",
    "DeleteObjects": "DELETE",
    "CopyObject": "COPY",
}


class RequestCounts:
    """Requests made to stores, by kind (KIND_NAMES), shared with the worker processes forked after it was
    made (the decode workers' GETs count in the process that made it)."""

    def __init__(self):
        self._counts = multiprocessing.RawArray("q", len(KIND_NAMES))
        self._lock = multiprocessing.Lock()

    def add(self, kind: str, n: int = 1) -> None:
        index = KIND_NAMES.index(kind) if kind in KIND_NAMES else len(KIND_NAMES) - 1
        with self._lock:
            self._counts[index] += n

    def snapshot(self) -> dict[str, int]:
        """Every kind's count so far."""
        with self._lock:
            return dict(zip(KIND_NAMES, self._counts))

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """The requests made since `before` (a snapshot), the kinds with none left out."""
        now = self.snapshot()
        return {k: now[k] - before.get(k, 0) for k in now if now[k] - before.get(k, 0)}

    def count_sent(self, fs) -> bool:
        """Count every HTTP request botocore sends for `fs` (retries included), by what it is; False for a
        store whose client is not botocore's (its user then counts each operation as one request)."""
        if getattr(fs, "_s3", "absent") == "absent":
            return False

        def counted(event_name: str, **_: Any) -> None:
            self.add(S3_KINDS.get(event_name.rsplit(".", 1)[-1], "OTHER"))

        fs.s3.meta.events.register("before-send.s3", counted)  # fs.s3 connects
        return True
