"""Listing the files of an image batch: stable ids, sizes, and what is cheap to know about each image.

A batch is a folder directly under the image root. Every file in it (recursively, dotfiles aside)
gets a row; files that are not usable images get status `error` and the reason, and what is
deliberately not read (symlinked folders, symlinks out of the root, FIFOs, names that are not
UTF-8) gets status `skipped` and the reason, so nothing is left out silently and the embedding step
only opens files worth opening.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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


def missing_batch_message(image_root: Path, batch: str, shown: int = 5) -> str:
    """Why a partition key has no folder, with the folders that do exist (the first few, and how many)."""
    if not image_root.is_dir():
        return f"Batch folder {batch} does not exist: the image root {image_root} itself does not exist."
    folders = list_batches(image_root)
    listed = ", ".join(folders[:shown]) + (f" ... ({len(folders)} in all)" if len(folders) > shown else "")
    return (
        f"Batch folder {batch} does not exist under {image_root}; "
        + (f"folders there: {listed}." if folders else "there are no batch folders there.")
    )


def image_id_for(relative_path: str) -> str:
    """Stable id of a file: a hash of its path relative to the image root (posix separators).

    A name that is not UTF-8 reaches Python with its bytes escaped (surrogateescape): the hash is of
    the bytes on disk, so such a file has an id of its own.
    """
    return hashlib.sha1(relative_path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def printable_path(relative_path: str) -> str:
    """The path as valid text: bytes that are not UTF-8 shown as \\xNN escapes."""
    return relative_path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_utf8(relative_path: str) -> bool:
    try:
        relative_path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


def _entries_under(batch_dir: Path):
    """Files, and symlinked folders (which os.walk does not enter), in path order; dotfiles aside."""
    for dirpath, dirnames, filenames in os.walk(batch_dir):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        linked = [d for d in dirnames if (here / d).is_symlink()]
        for name in sorted([*linked, *(f for f in filenames if not f.startswith("."))]):
            yield here / name


@dataclass(frozen=True)
class ListedFile:
    """A manifest row as far as `stat` can tell: what the re-scan compares without opening files."""

    path: Path
    relative_path: str  # as stored: valid UTF-8, bytes that are not shown as \xNN
    image_id: str
    size: int | None
    mtime: float | None
    status: str
    error: str | None


def list_files(image_root: Path, batch: str) -> Iterator[ListedFile]:
    """Every entry of a batch in path order, with size and mtime where there is a file to stat."""
    root = image_root.resolve()
    batch_dir = image_root / batch
    if not batch_dir.is_dir():
        raise FileNotFoundError(missing_batch_message(image_root, batch))
    for path in _entries_under(batch_dir):
        rel = path.relative_to(image_root).as_posix()
        size = mtime = error = None
        status = STATUS_OK
        if not _is_utf8(rel):
            status = STATUS_SKIPPED
            error = f"path is not valid UTF-8 ({os.fsencode(rel)!r}): rename it to UTF-8 to include the file"
        elif path.is_symlink() and path.is_dir():
            status, error = STATUS_SKIPPED, "symlinked folder: not followed"
        elif path.is_symlink() and not path.resolve().is_relative_to(root):
            status, error = STATUS_SKIPPED, "symlink leads outside the image root"
        elif path.exists() and not path.is_file():
            status, error = STATUS_SKIPPED, "not a regular file (FIFO, socket or device)"
        else:
            try:
                st = path.stat()
                size, mtime = st.st_size, st.st_mtime
            except OSError as exc:
                status, error = STATUS_ERROR, f"{type(exc).__name__}: {exc}"
            if status == STATUS_OK and size == 0:
                status, error = STATUS_ERROR, "empty file"
        yield ListedFile(path, printable_path(rel), image_id_for(rel), size, mtime, status, error)


def build_manifest(image_root: Path, batch: str) -> pa.Table:
    """One row per file of the batch, in path order; the header of every file that stat passed is read."""
    rows: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    for entry in list_files(image_root, batch):
        status, error, fmt, width, height = entry.status, entry.error, None, None, None
        if status == STATUS_OK:
            fmt, width, height, error = _probe(entry.path)
            if error:
                status = STATUS_ERROR
        for name, value in zip(
            MANIFEST_SCHEMA.names,
            (entry.image_id, entry.relative_path, entry.size, entry.mtime, fmt, width, height, status, error),
        ):
            rows[name].append(value)
    return pa.table(rows, schema=MANIFEST_SCHEMA)
