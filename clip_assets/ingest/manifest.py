"""Listing the files of an image batch: stable ids, sizes and mtimes, from `stat` alone.

A batch is a folder directly under the image root (or, for a root in an object store, a "folder" under
its prefix: its objects are listed in one LIST pass, clip_assets.storage.store_root, with the same ids,
rows and statuses as the same files on a local disk). Every file in it (recursively, dotfiles aside)
gets a row; what `stat` shows cannot be an image (an empty file, one that cannot be stat-ed or read,
a symlink loop) gets status `error` and the reason, and what is deliberately not read (symlinked folders, symlinks
out of the root, FIFOs, names that are not UTF-8) gets status `skipped` and the reason, so nothing is
left out silently. No file is opened here: at a million files, opening each one's header took twice
as long as the listing. A file that is not an image after all (unknown format, truncated or broken
header, too many pixels) is found when the embedding step decodes it, and recorded there with the
reason (`embedding_failures/<batch>.parquet`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from clip_assets.config.layout import DataLayout
from clip_assets.storage.damaged_files import MANIFEST, DamagedFileError, readable_parquet_files
from clip_assets.storage.store_root import StoreRoot

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_SKIPPED = "skipped"

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("size", pa.int64()),
        pa.field("mtime", pa.float64()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)


def list_batches(image_root: Path | StoreRoot) -> list[str]:
    """Names of the batch folders under the image root, sorted."""
    if isinstance(image_root, StoreRoot):
        return image_root.list_batches()
    if not image_root.is_dir():
        raise FileNotFoundError(
            f"Image root {image_root} does not exist (set CLIP_ASSETS_IMAGE_ROOT to the folder whose "
            "sub-folders are your image batches)."
        )
    return sorted(p.name for p in image_root.iterdir() if p.is_dir() and not p.name.startswith("."))


def batch_exists(image_root: Path | StoreRoot, batch: str) -> bool:
    """Whether the batch's folder (or, in a store, anything under its prefix) is there."""
    if isinstance(image_root, StoreRoot):
        return image_root.batch_exists(batch)
    return (image_root / batch).is_dir()


def missing_batch_message(image_root: Path | StoreRoot, batch: str, shown: int = 5) -> str:
    """Why a partition key has no folder, with the folders that do exist (the first few, and how many)."""
    if not isinstance(image_root, StoreRoot) and not image_root.is_dir():
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

    path: Path | str  # the file, or the object's URL
    relative_path: str  # as stored: valid UTF-8, bytes that are not shown as \xNN
    image_id: str
    size: int | None
    mtime: float | None
    status: str
    error: str | None


def _stat_entry(path: Path, root: Path) -> tuple[str, str | None, int | None, float | None]:
    """(status, reason, size, mtime) of one entry: an lstat, and for a symlink a stat of its target."""
    try:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            if path.is_dir():
                return STATUS_SKIPPED, "symlinked folder: not followed", None, None
            if not path.resolve().is_relative_to(root):
                return STATUS_SKIPPED, "symlink leads outside the image root", None, None
            st = path.stat()
    except RuntimeError as exc:  # Path.resolve on a link that leads back to itself
        return STATUS_ERROR, f"symlink loop: {exc}", None, None
    except OSError as exc:
        return STATUS_ERROR, f"{type(exc).__name__}: {exc}", None, None
    if not stat.S_ISREG(st.st_mode):
        return STATUS_SKIPPED, "not a regular file (FIFO, socket or device)", None, None
    if st.st_size == 0:
        return STATUS_ERROR, "empty file", st.st_size, st.st_mtime
    if not os.access(path, os.R_OK):  # the permission bits, not an open
        return STATUS_ERROR, "PermissionError: not readable by this user", st.st_size, st.st_mtime
    return STATUS_OK, None, st.st_size, st.st_mtime


def list_files(image_root: Path | StoreRoot, batch: str) -> Iterator[ListedFile]:
    """Every entry of a batch in path order, with size and mtime where there is a file to stat."""
    if isinstance(image_root, StoreRoot):
        yield from _list_objects(image_root, batch)
        return
    root = image_root.resolve()
    batch_dir = image_root / batch
    if not batch_dir.is_dir():
        raise FileNotFoundError(missing_batch_message(image_root, batch))
    for path in _entries_under(batch_dir):
        rel = path.relative_to(image_root).as_posix()
        if _is_utf8(rel):
            status, error, size, mtime = _stat_entry(path, root)
        else:
            status, size, mtime = STATUS_SKIPPED, None, None
            error = f"path is not valid UTF-8 ({os.fsencode(rel)!r}): rename it to UTF-8 to include the file"
        yield ListedFile(path, printable_path(rel), image_id_for(rel), size, mtime, status, error)


def _list_objects(root: StoreRoot, batch: str) -> Iterator[ListedFile]:
    """A batch's objects as a local batch's files: an empty object is an error, as an empty file is; a batch
    with no object at all is missing, as a folder that is not there."""
    objects = root.list_objects(batch)
    if not objects and not root.batch_exists(batch):
        raise FileNotFoundError(missing_batch_message(root, batch))
    for o in objects:
        status, error = (STATUS_ERROR, "empty file") if o.size == 0 else (STATUS_OK, None)
        yield ListedFile(f"{root.url}/{o.relative_path}", o.relative_path, image_id_for(o.relative_path), o.size,
                         o.mtime, status, error)


def build_manifest(image_root: Path | StoreRoot, batch: str) -> pa.Table:
    """One row per entry of the batch, in path order, from `stat` alone (no file is opened)."""
    entries = list(list_files(image_root, batch))
    return pa.table(
        {
            "image_id": [e.image_id for e in entries],
            "path": [e.relative_path for e in entries],
            "size": [e.size for e in entries],
            "mtime": [e.mtime for e in entries],
            "status": [e.status for e in entries],
            "error": [e.error for e in entries],
        },
        schema=MANIFEST_SCHEMA,
    )


def readable_manifests(layout: DataLayout, damaged: list[DamagedFileError] | None = None) -> list[str]:
    """Every batch's manifest that can be read, as a list for DuckDB's read_parquet: a reader of the whole
    collection leaves a damaged one out (logged as a warning, added to `damaged` when it is given) and
    reads the others. Without any manifest: the layout's pattern, which DuckDB refuses as before."""
    good, bad = readable_parquet_files(sorted(layout.manifest_dir.glob("*.parquet")), MANIFEST)
    if damaged is not None:
        damaged += bad
    return [str(p) for p in good] or [layout.manifests_glob]


def image_paths(layout: DataLayout, ids_by_batch: Mapping[str, Iterable[str]],
                damaged: list[DamagedFileError] | None = None) -> dict[str, str]:
    """image_id -> path relative to the image root, from the batches' manifests, for a few images of
    each batch (only their rows are read); a batch without a manifest adds nothing, nor does one whose
    manifest is damaged (logged as a warning, and added to `damaged` when it is given)."""
    return {image_id: row["path"] for image_id, row in image_rows(layout, ids_by_batch, ["path"], damaged).items()}


def image_rows(layout: DataLayout, ids_by_batch: Mapping[str, Iterable[str]], columns: list[str],
               damaged: list[DamagedFileError] | None = None) -> dict[str, dict]:
    """image_id -> {column: value} of the manifests' `columns` for a few images of each batch, as
    image_paths reads them."""
    rows: dict[str, dict] = {}
    for batch, ids in ids_by_batch.items():
        wanted = sorted(set(ids))
        manifest = layout.manifest_path(batch)
        if not wanted or not manifest.is_file():
            continue
        try:
            with MANIFEST.reading(manifest, batch):
                found = pq.read_table(manifest, columns=["image_id", *columns], filters=[("image_id", "in", wanted)])
        except DamagedFileError as exc:
            log.warning("image paths not named: %s", exc)
            if damaged is not None:
                damaged.append(exc)
            continue
        values = {c: found[c].to_pylist() for c in columns}
        for k, image_id in enumerate(found["image_id"].to_pylist()):
            rows[image_id] = {c: values[c][k] for c in columns}
    return rows
