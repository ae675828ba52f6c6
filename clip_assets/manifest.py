"""Listing the files of an image batch: stable ids, sizes, and what is cheap to know about each image.

A batch is a folder directly under the image root. Every file in it (recursively, dotfiles aside)
gets a row; files that are not usable images get status `error` and the reason, so nothing is lost
silently and the embedding step only opens files worth opening.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import pyarrow as pa
from PIL import Image

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_SKIPPED = "skipped"

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("size", pa.int64()),
        pa.field("mtime", pa.float64()),
        pa.field("format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)


def list_batches(image_root: Path) -> list[str]:
    """Names of the batch folders under the image root, sorted."""
    if not image_root.is_dir():
        raise FileNotFoundError(
            f"Image root {image_root} does not exist (set CLIP_ASSETS_IMAGE_ROOT to the folder whose "
            "sub-folders are your image batches)."
        )
    return sorted(p.name for p in image_root.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_id_for(relative_path: str) -> str:
    """Stable id of a file: a hash of its path relative to the image root (posix separators)."""
    return hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:16]


def _probe(path: Path) -> tuple[str | None, int | None, int | None, str | None]:
    """Format and size from the image header, or the reason the file is not a usable image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.format, img.width, img.height, None
    except Image.DecompressionBombWarning as exc:
        return None, None, None, f"decompression bomb: {exc}"
    except Exception as exc:  # PIL raises many types for unreadable files
        return None, None, None, f"{type(exc).__name__}: {exc}"


def _files_under(batch_dir: Path):
    for dirpath, dirnames, filenames in os.walk(batch_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def build_manifest(image_root: Path, batch: str) -> pa.Table:
    """One row per file of the batch, in path order."""
    root = image_root.resolve()
    batch_dir = image_root / batch
    if not batch_dir.is_dir():
        raise FileNotFoundError(f"Batch folder {batch_dir} does not exist.")
    rows: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    for path in _files_under(batch_dir):
        rel = path.relative_to(image_root).as_posix()
        size = mtime = fmt = width = height = error = None
        status = STATUS_OK
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            status, error = STATUS_SKIPPED, "symlink leads outside the image root"
        elif path.exists() and not path.is_file():
            status, error = STATUS_SKIPPED, "not a regular file (FIFO, socket or device)"
        else:
            try:
                st = path.stat()
                size, mtime = st.st_size, st.st_mtime
            except OSError as exc:
                status, error = STATUS_ERROR, f"{type(exc).__name__}: {exc}"
            if status == STATUS_OK:
                if size == 0:
                    status, error = STATUS_ERROR, "empty file"
                else:
                    fmt, width, height, error = _probe(path)
                    if error:
                        status = STATUS_ERROR
        for name, value in zip(
            MANIFEST_SCHEMA.names,
            (image_id_for(rel), rel, size, mtime, fmt, width, height, status, error),
        ):
            rows[name].append(value)
    return pa.table(rows, schema=MANIFEST_SCHEMA)
