"""The sha256 of a file's bytes, read a block at a time: what names a checkpoint, versions a labels
file and names a file written by its content."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path


CONTENT_DIGEST_CHARS = 12  # hex of the sha256 that names a file by its content


def file_sha256(path: Path | str) -> str:
    """The hex sha256 of the file's bytes; callers keep the prefix they name things with."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_digest(path: Path | str) -> str:
    """The short content hash a file is named and identified by: a checkpoint's name, its model
    identity and `fine_tuned_model`'s data version all hold this same prefix."""
    return file_sha256(path)[:CONTENT_DIGEST_CHARS]


def current_content_digest(path: Path | str) -> str:
    """content_digest of the file as it is now, hashed again only when its size or mtime changed
    (FileNotFoundError when it is not there)."""
    path = Path(path).resolve()
    st = path.stat()
    return _digest_of_version(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest_of_version(path: str, size: int, mtime_ns: int) -> str:
    return content_digest(path)
