"""Replacing a file without a torn write, and sweeping up after writers that died.

`atomic_write(path)` hands out a temp path next to the target; on success the temp file is renamed
over the target (readers see the old file or the new one, never half of one), on any failure (a
full disk, an exception, Ctrl-C) it is removed and the target is left as it was. A process killed
outright (SIGKILL, OOM) cannot clean up, so steps that write call `sweep_stale_temp_files` first.

A write that runs out of space (a full disk, a quota, the file-size limit) raises `DiskFullError`,
an OSError that names the file, the space left and what to do. Serialisers written in C++ (torch's,
TorchScript's, faiss's) write into memory first and their bytes go through `write_bytes_atomically`:
torch's file writer aborts the whole process when a TorchScript file hits a full disk, and faiss's
ignores an error that shows only when the file is closed.

A temp file is named `.clip-assets-tmp~<pid>~<host>~<random>~<start of the target's name>.tmp`:
short whatever the target's name (under 140 bytes, well below the 255-byte file-name limit), unique
per write, never matching the target's own pattern (`*.parquet`, `*.toml`: glob matches dot files),
and it says which process on which machine wrote it, so the sweep can tell an abandoned one.

In the local copy of a data directory kept in an object store (clip_assets.storage.object_store),
every write here is also published: the finished temp file is uploaded to the target's key with one
put before it is renamed into place, so a failed upload leaves the old file both there and here.
`remove_file`, `remove_folder` and `link_unless_there` are the deletes and the first-writer-wins
link, which apply to the store the same way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from clip_assets.storage import object_store
from clip_assets.storage.file_hashes import content_digest

TEMP_MARKER = ".clip-assets-tmp"
_HOST_BYTES = 32
_TARGET_PREFIX_BYTES = 64
_TEMP_NAME = re.compile(r"^\.clip-assets-tmp~(\d+)~([^~]*)~[0-9a-f]{8}~")
# Temp files of another machine (a shared volume) or of a live process are removed only this old:
# no write of this project takes that long, and a PID can be reused.
STALE_AFTER_S = 24 * 3600
_OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_OUT_OF_SPACE_WORDS = ("No space left on device", "Disk quota exceeded", "File too large")


class DiskFullError(OSError):
    """A write ran out of space; the file it would have replaced is unchanged and no temp file is left."""


def is_out_of_space(exc: BaseException) -> bool:
    """Whether `exc` says a write ran out of space (by its errno, or in words: pyarrow's, faiss's, DuckDB's)."""
    if isinstance(exc, OSError) and exc.errno in _OUT_OF_SPACE:
        return True
    return isinstance(exc, Exception) and any(words in str(exc) for words in _OUT_OF_SPACE_WORDS)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def disk_full_error(path: Path, exc: BaseException) -> DiskFullError:
    """The error a write of `path` that ran out of space raises: the file, the space left, what to do."""
    try:
        free = f"{_megabytes(shutil.disk_usage(path.parent).free)} free there"
    except OSError:
        free = "free space unknown"
    code = exc.errno if isinstance(exc, OSError) and exc.errno in _OUT_OF_SPACE else errno.ENOSPC
    reason = "the file-size limit was reached" if code == errno.EFBIG else "no space left on device"
    return DiskFullError(
        code,
        f"{path} could not be written: {reason} ({free}). Nothing was replaced: the previous "
        f"{path.name} (if any) is as it was and no temp file is left. Free some space under "
        f"{path.parent} (or move the data directory) and run again.",
    )


def _cut(text: str, max_bytes: int) -> str:
    """At most max_bytes of text's file-system encoding, never splitting a character."""
    return os.fsencode(text)[:max_bytes].decode("utf-8", "ignore")


def _host() -> str:
    return _cut(socket.gethostname().replace("~", "-").replace("/", "-"), _HOST_BYTES)


def temp_path_for(path: Path) -> Path:
    """A fresh temp path in the target's folder; its name never nears the file-name limit."""
    token = secrets.token_hex(4)
    prefix = _cut(path.name, _TARGET_PREFIX_BYTES)
    return path.with_name(f"{TEMP_MARKER}~{os.getpid()}~{_host()}~{token}~{prefix}.tmp")


def _publish(tmp: Path, path: Path) -> None:
    """Upload the finished `tmp` as `path`'s object when `path` is in the local copy of a store."""
    store = object_store.store_for(path)
    if store is not None:
        store.publish(tmp, path)


def remove_file(path: Path) -> None:
    """Remove a file (nothing when there is none), and its object when it is in the local copy of a store."""
    path = Path(path)
    store = object_store.store_for(path)
    if store is not None:
        store.remove(path)
    path.unlink(missing_ok=True)


def remove_folder(folder: Path, keep: re.Pattern[str] | None = None) -> None:
    """Remove a folder and its files (and their objects, in the local copy of a store); files whose name
    matches `keep` stay, and so does the folder then."""
    folder = Path(folder)
    store = object_store.store_for(folder)
    if store is not None:
        store.remove_tree(folder, keep)
    entries = list(folder.iterdir()) if folder.is_dir() else []
    if keep is None or not any(keep.search(path.name) for path in entries):
        shutil.rmtree(folder, ignore_errors=True)
        return
    for path in entries:
        if not keep.search(path.name):
            path.unlink(missing_ok=True)


def link_unless_there(source: Path, target: Path) -> bool:
    """Give the finished file `source` the name `target` too, unless a file is there already (the first
    writer wins). In the local copy of a store the object is looked for, then uploaded: two machines in
    the same second could both win, the later upload staying."""
    source, target = Path(source), Path(target)
    store = object_store.store_for(target)
    if store is not None:
        store.refresh(target)
        if target.exists():
            return False
        _publish(source, target)
    try:
        os.link(source, target)
        return True
    except FileExistsError:
        return False


@contextlib.contextmanager
def atomic_write(path: Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temp path to write; rename it over `path` on success, remove it on any failure.

    durable: fsync the file before the rename (survives a power cut, not only a crash).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _publish(tmp, path)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if is_out_of_space(exc) and not isinstance(exc, DiskFullError):
            raise disk_full_error(path, exc) from exc
        raise


@contextlib.contextmanager
def folder_removed_on_failure(folder: Path) -> Iterator[Path]:
    """A folder a step fills file by file (a page and its thumbnails): removed whole when the step fails
    before it is done, if this call made it (a folder that was there before is left alone)."""
    folder = Path(folder)
    made = not folder.exists()
    try:
        yield folder
    except BaseException:
        if made:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def write_named_by_content(directory: Path, name_for: Callable[[str], str], write: Callable[[Path], None]) -> Path:
    """Write a file whose name holds the hash of its content (`name_for(file_hashes.content_digest)`).

    `write(tmp)` fills a temp file in `directory`; once hashed it is renamed to its name, so a reader
    sees a whole file or none, and the same content always lands on the same name.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(directory / name_for("content"))
    try:
        write(tmp)
        target = directory / name_for(content_digest(tmp))
        _publish(tmp, target)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if is_out_of_space(exc) and not isinstance(exc, DiskFullError):
            raise disk_full_error(directory / name_for("<content hash>"), exc) from exc
        raise
    return target


def write_parquet_atomically(table: pa.Table, path: Path) -> None:
    """Readers see the old file or the new one; a failed write leaves the old one and no temp file."""
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp)


def write_text_atomically(text: str, path: Path) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomically(data: bytes | memoryview, path: Path) -> None:
    """`data` (bytes, or any buffer: a BytesIO's getbuffer(), a numpy array) written through Python's
    own file, whose every failure (the last flush included) raises."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale_temp_files(directory: Path, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove this project's temp files in `directory` that no running write will finish.

    Abandoned: written on this machine by a process that is gone, or older than `stale_after_s`
    (another machine's, or a PID reused since). Files of other names are never touched. Returns
    what was removed.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    host, me, now = _host(), os.getpid(), time.time()
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        pid, writer_host = int(match.group(1)), match.group(2)
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:  # renamed into place or removed meanwhile
            continue
        ours = writer_host == host
        if ours and pid == me:
            continue  # this process's own write, in flight on another thread
        if (ours and not _process_alive(pid)) or age > stale_after_s:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed
