"""The sha256 of a file's bytes, read a block at a time: what names a checkpoint, versions a labels
file and names a file written by its content."""

from __future__ import annotations

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
