"""The content check: files whose bytes changed though their size and mtime did not.

The manifest and the embedding step trust `stat`: a file whose size and mtime are unchanged keeps its
embedding without being read. A file replaced by one of the same size with its mtime kept (`cp -p`,
`rsync -t`, a restore from backup) is then never noticed. The content check reads such files again
and compares the fingerprint of their bytes (the one the embedding step stores, sha1 of the bytes)
with the stored one, a slice at a time, within a time budget, so its rate is bounded: each call
goes on from where the last stopped and a full pass over the collection spans as many calls as it
needs. Images found changed are written to the batch's content-changes file
(DataLayout.content_changes_path), which the batch's next embedding run reads: it encodes those
images again (clip_assets.embedding.store.plan_encoding) and then removes the file.

The `content_check` schedule (clip_assets.defs.ingest.schedules) runs it, off by default.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from clip_assets.config.layout import DataLayout
from clip_assets.embedding.decode import fingerprint
from clip_assets.storage.atomic_files import remove_file, write_text_atomically
from clip_assets.storage.store_root import StoreRoot, file_stat, read_file_bytes
from clip_assets.storage.store_urls import StoreError


@dataclass
class ContentCheckSlice:
    changed: dict[str, list[str]] = field(default_factory=dict)  # batch -> image_ids whose bytes changed
    checked_files: int = 0
    checked_bytes: int = 0
    next_position: tuple[str, int] | None = None  # (batch, row) the next slice begins at; None: a pass ended


def stored_fingerprints(layout: DataLayout, batch: str) -> list[tuple[str, str, int, float, str]]:
    """(image_id, path, size, mtime, fingerprint) of the batch's embedded images, in manifest order."""
    embedded = pq.read_table(layout.embeddings_path(batch), columns=["image_id", "size", "mtime", "fingerprint"])
    stored = {i: (s, m, f) for i, s, m, f in zip(*(embedded[c].to_pylist() for c in embedded.column_names))}
    manifest = pq.read_table(layout.manifest_path(batch), columns=["image_id", "path"])
    return [(i, p, *stored[i]) for i, p in zip(manifest["image_id"].to_pylist(), manifest["path"].to_pylist())
            if i in stored and stored[i][2] is not None]


def content_check_slice(
    image_root: Path | StoreRoot, layout: DataLayout, batches: list[str], position: tuple[str, int] | None, budget_s: float,
    report: Callable[[str], None] = lambda _: None, clock: Callable[[], float] = time.monotonic,
) -> ContentCheckSlice:
    """Re-hash, from `position` on, the files whose stat still matches their stored embedding, until
    the last batch or until `budget_s` is spent (at least one file per call, so every pass ends).

    A file whose stat changed is left to the re-scan (it is re-encoded anyway); a file that is gone or
    unreadable is skipped (the manifest records it); a batch whose stored files can't be read is
    skipped with a report. Nothing is re-encoded here: the changed images are recorded per batch.
    """
    start_batch, start_row = position if position and position[0] in batches else (batches[0] if batches else "", 0)
    found = ContentCheckSlice()
    deadline = clock() + budget_s
    for batch in batches[batches.index(start_batch):] if batches else []:
        try:
            rows = stored_fingerprints(layout, batch)
        except (OSError, KeyError, ValueError) as exc:  # not embedded yet, or a damaged file: its steps say so
            report(f"{batch}: left out of the content check ({type(exc).__name__}: {exc})")
            rows = []
        for row in range(start_row if batch == start_batch else 0, len(rows)):
            if found.checked_files and clock() >= deadline:
                found.next_position = (batch, row)
                return found
            image_id, path, size, mtime, stored = rows[row]
            try:
                if file_stat(image_root, path) != (size, mtime):
                    continue  # a stat change: the re-scan's business
                data = read_file_bytes(image_root, path)
            except (OSError, StoreError):
                continue
            found.checked_files += 1
            found.checked_bytes += len(data)
            if fingerprint(data) != stored:
                found.changed.setdefault(batch, []).append(image_id)
    return found


def read_content_changes(layout: DataLayout, batch: str) -> set[str]:
    """The batch's images recorded as changed under an unchanged stat (empty when none, or unreadable)."""
    try:
        return set(json.loads(layout.content_changes_path(batch).read_text())["image_ids"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def record_content_changes(layout: DataLayout, changed: dict[str, list[str]]) -> None:
    for batch, image_ids in changed.items():
        ids = sorted(read_content_changes(layout, batch) | set(image_ids))
        path = layout.content_changes_path(batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(json.dumps({"image_ids": ids}), path)


def clear_content_changes(layout: DataLayout, batch: str) -> None:
    remove_file(layout.content_changes_path(batch))


def read_content_check_position(layout: DataLayout) -> tuple[str, int] | None:
    try:
        batch, row = json.loads(layout.content_check_position_path.read_text())["next"]
        return str(batch), int(row)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_content_check_position(layout: DataLayout, position: tuple[str, int] | None) -> None:
    write_text_atomically(json.dumps({"next": position}), layout.content_check_position_path)
