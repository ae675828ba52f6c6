"""Finding new and changed image batches cheaply: what the discovery sensor and the re-scan schedule decide on.

New batches: one `stat` of the image root tells whether any folder was added or removed since the
last look (a directory's mtime changes when an entry is created, renamed or deleted in it); only then
are the batch folders listed, and the names are compared with the ones already registered. Nothing
is opened or hashed, so a root with thousands of batches costs a directory listing, not a re-scan.

Changed batches: a batch's fingerprint is a hash of (relative path, size, mtime) of its files, the
same three columns its manifest stores. The fingerprint of the files on disk now is compared with
the fingerprint of the manifest last written: equal means nothing was added, removed or rewritten.

A root in an object store has no mtime: each look lists its batch "folders" (one LIST request), and the
cursor keeps a hash of their names in place of the mtime, so the instance is asked for its partitions
only when a name was added or removed. A changed batch there is an object with another size or
LastModified (a PUT always sets it anew).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pyarrow.parquet as pq

from clip_assets.config.layout import DataLayout
from clip_assets.ingest.manifest import list_batches, list_files
from clip_assets.storage.atomic_files import write_text_atomically
from clip_assets.storage.store_root import StoreRoot
from clip_assets.storage.store_urls import StoreError

# What Dagster refuses in a partition key (its private INVALID_PARTITION_SUBSTRINGS, copied so this
# module does not import Dagster; clip_assets_tests/instance/test_dagster_internals.py keeps them equal).
INVALID_PARTITION_SUBSTRINGS = ("...", "\a", "\b", "\f", "\n", "\r", "\t", "\v", "\0")


@dataclass
class DiscoveryCursor:
    """What the discovery sensor remembers between ticks.

    root_mtime_ns: the image root's mtime when it was last listed (None: never listed); for a root in an
      object store, a hash of its batch names then.
    pending: batches registered but whose runs wait for something they need (the prompt centroids).
    """

    root_mtime_ns: int | None = None
    pending: list[str] = field(default_factory=list)

    def serialize(self) -> str:
        return json.dumps({"root_mtime_ns": self.root_mtime_ns, "pending": self.pending})

    @classmethod
    def parse(cls, text: str | None) -> "DiscoveryCursor":
        if not text:
            return cls()
        data = json.loads(text)
        return cls(root_mtime_ns=data.get("root_mtime_ns"), pending=list(data.get("pending", [])))


@dataclass
class Discovery:
    new: list[str]          # batch folders not registered before: add them as partitions
    listed: bool            # False when the root had not changed and was not listed at all
    cursor: DiscoveryCursor
    refused: dict[str, str] = field(default_factory=dict)  # folders that can't be batches, and why


def _names_token(names: list[str]) -> int:
    """A store root's stand-in for a folder's mtime: changes when a batch name is added or removed."""
    return int(hashlib.sha256("\0".join(names).encode("utf-8")).hexdigest()[:15], 16)


def discover_new_batches(
    image_root: Path | StoreRoot, known: Callable[[], Iterable[str]], cursor: DiscoveryCursor
) -> Discovery:
    """Batch folders under the root that are not in `known()`, listing the root only if it changed.

    `known` is called only when the root changed: asking the instance for its partitions is skipped too.
    """
    names = list_batches(image_root) if isinstance(image_root, StoreRoot) else None
    root_mtime_ns = _names_token(names) if names is not None else image_root.stat().st_mtime_ns
    if cursor.root_mtime_ns == root_mtime_ns:
        return Discovery(new=[], listed=False, cursor=cursor)
    registered = set(known())
    found = [b for b in (names if names is not None else list_batches(image_root)) if b not in registered]
    refused = {b: reason for b in found if (reason := refused_batch_name(b))}
    return Discovery(
        new=[b for b in found if b not in refused],
        listed=True,
        cursor=DiscoveryCursor(root_mtime_ns, cursor.pending),
        refused=refused,
    )


def _fingerprint(rows: Iterable[tuple[str, int | None, float | None]]) -> str:
    digest = hashlib.sha256()
    for path, size, mtime in sorted(rows, key=lambda r: r[0]):
        digest.update(f"{path}\0{size}\0{mtime!r}\n".encode("utf-8"))
    return digest.hexdigest()[:24]


def files_fingerprint(image_root: Path | StoreRoot, batch: str) -> str:
    """Fingerprint of a batch's files as they are on disk now: stat only, no file is opened."""
    return _fingerprint((f.relative_path, f.size, f.mtime) for f in list_files(image_root, batch))


def manifest_fingerprint(manifest_path: Path) -> str | None:
    """Fingerprint of the files a written manifest lists (None when there is no manifest)."""
    if not manifest_path.exists():
        return None
    table = pq.read_table(manifest_path, columns=["path", "size", "mtime"])
    return _fingerprint(zip(*(table[c].to_pylist() for c in ("path", "size", "mtime"))))


def batch_changed(image_root: Path | StoreRoot, layout: DataLayout, batch: str, report: Callable[[str], None]) -> bool:
    """Whether a batch's files differ from its last manifest (or it has none). A folder that is gone or
    can't be listed is not changed (nothing to re-scan; reported); a manifest that can't be read is."""
    if not isinstance(image_root, StoreRoot) and not (image_root / batch).is_dir():
        return False
    try:
        on_disk = files_fingerprint(image_root, batch)
    except FileNotFoundError:  # gone (a store's batch is listed first: nothing under its prefix any more)
        return False
    except (OSError, StoreError) as exc:  # a local folder's error, or the store's
        report(f"{batch}: its folder could not be listed ({exc}); left out of this re-scan")
        return False
    try:
        listed = manifest_fingerprint(layout.manifest_path(batch))
    except Exception as exc:  # a truncated or foreign file: pyarrow raises its own errors
        report(f"{batch}: its manifest could not be read ({type(exc).__name__}: {exc}); listed again")
        listed = None
    return on_disk != listed


def changed_batches(
    image_root: Path | StoreRoot, layout: DataLayout, batches: Iterable[str], report: Callable[[str], None] = lambda _: None
) -> list[str]:
    """Registered batches whose files differ from their last manifest (or that have none yet).

    Batches whose folder is gone are left out: there is nothing to re-scan. One batch never stops
    the others: a manifest that can't be read counts as changed (listing the batch again rewrites
    it), and a folder that can't be listed is left out; both are reported with their reason.
    """
    return [batch for batch in batches if batch_changed(image_root, layout, batch, report)]


@dataclass
class RescanSlice:
    changed: list[str]  # batches found changed, in partition order
    checked: int  # batches compared in this slice
    next_start: str | None  # where the next slice begins; None when this one reached the last batch


def rescan_slice(
    image_root: Path | StoreRoot, layout: DataLayout, batches: list[str], start: str | None, budget_s: float,
    report: Callable[[str], None] = lambda _: None, clock: Callable[[], float] = time.monotonic,
) -> RescanSlice:
    """Compare batches with their manifests from `start` on (the first when None or gone), until the
    last one or until `budget_s` is spent.

    Each batch costs a `stat` of its files and a read of its manifest's three columns: with tens of
    thousands of batches, or batches of a million files, one pass takes longer than a schedule tick
    may (Dagster gives a tick 60 s), so each tick takes the next slice and says where the next begins.
    At least one batch is compared per slice, so every pass ends.
    """
    first = batches.index(start) if start in batches else 0
    order = batches[first:]
    deadline = clock() + budget_s
    changed, checked = [], 0
    for batch in order:
        if checked and clock() >= deadline:
            return RescanSlice(changed, checked, batch)
        if batch_changed(image_root, layout, batch, report):
            changed.append(batch)
        checked += 1
    return RescanSlice(changed, checked, None)


def read_rescan_position(layout: DataLayout) -> str | None:
    """The batch the next re-scan slice begins with (None: the first), as the last slice left it."""
    try:
        return json.loads(layout.rescan_position_path.read_text()).get("next")
    except (OSError, ValueError, AttributeError):
        return None


def write_rescan_position(layout: DataLayout, next_start: str | None) -> None:
    write_text_atomically(json.dumps({"next": next_start}), layout.rescan_position_path)


def refused_batch_name(name: str) -> str | None:
    """Why a folder name can't be a batch (a Dagster partition key), or None when it can."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8; rename the folder"
    bad = [s for s in INVALID_PARTITION_SUBSTRINGS if s in name]
    if bad:
        return f"its name contains {', '.join(repr(s) for s in bad)}, which Dagster refuses in a partition key; rename the folder"
    return None


def contiguous_ranges(order: list[str], wanted: Iterable[str], max_per_run: int) -> list[tuple[str, str]]:
    """(first, last) partition ranges covering `wanted`, each at most `max_per_run` long.

    `order` is the partitions' order in the instance (the order they were added): a run over a range
    of dynamic partitions covers every key between its ends, so a range never spans a key that is
    not wanted.
    """
    wanted = set(wanted)
    ranges, run = [], []
    for key in order:
        if key in wanted and len(run) < max_per_run:
            run.append(key)
            continue
        if run:
            ranges.append((run[0], run[-1]))
        run = [key] if key in wanted else []
    if run:
        ranges.append((run[0], run[-1]))
    return ranges
