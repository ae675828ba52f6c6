"""The sha256 of a file's bytes, read a block at a time: what names a checkpoint, versions a labels
or captions file and names a file written by its content. One function, `content_digest`; what
differs between its uses is only how many hex characters of the sha256 each keeps."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

CONTENT_DIGEST_CHARS = 12  # hex of the sha256 that names a file by its content
# hex of the sha256 that versions a human-edited source file (labels, prompts, captions): the data
# version its observations record and what the adapters' version is built from. Stored in asset
# data versions and checkpoints, so it stays 16 (not CONTENT_DIGEST_CHARS).
SOURCE_VERSION_CHARS = 16


def content_digest(path: Path | str, chars: int = CONTENT_DIGEST_CHARS) -> str:
    """The first `chars` hex characters of the sha256 of the file's bytes. By default the short hash
    a file is named and identified by: a checkpoint's name, its model identity and `fine_tuned_model`'s
    data version all hold this same prefix."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:chars]


def current_content_digest(path: Path | str) -> str:
    """content_digest of the file as it is now, hashed again only when its size or mtime changed
    (FileNotFoundError when it is not there)."""
    path = Path(path).resolve()
    st = path.stat()
    return _digest_of_version(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest_of_version(path: str, size: int, mtime_ns: int) -> str:
    return content_digest(path)
