"""The labels people give in the review pages, stored durably one click at a time (`<data dir>/labels/review_labels.sqlite`).

Every verdict is a record appended to one SQLite table and never changed: the image (its path
relative to the image root, and its batch), the category, the verdict (`yes`, `no` or `skip`), the
time, the queue it was given in (`estimate`, `improve`, or `import` for labels read from a file),
the model and prompt version the page showed, who gave it (optional), a record id, and the client's
request id. An undo is a record too (verdict `undo`, `undoes` = the record it takes back): nothing is
ever deleted, so the whole history can be read back.

Why SQLite, and not the DuckDB warehouse: clip_assets.storage.record_store, the store this shares
with the near-duplicate page's choices. A crash or a power cut loses nothing acknowledged, and two
tabs or two people at once both land. A request id (the client's, unique) makes a retried request
land once: the second attempt returns the first record.

What a verdict says downstream (`current_verdicts`): per image and category, the latest record that
is not undone; an undone one falls back to the one before. Only `yes` and `no` are labels: `skip`
means "not judged". Exporting, importing and combining with the labels file (CLIP_ASSETS_LABELS):
clip_assets.tuning.label_sources.
"""

from __future__ import annotations

import datetime
import hashlib
import sqlite3
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

from clip_assets.storage.file_hashes import SOURCE_VERSION_CHARS
from clip_assets.storage.record_store import RecordStore, insert_once
from clip_assets.tuning.labels_file import LabelRows

YES, NO, SKIP, UNDO = "yes", "no", "skip", "undo"
VERDICTS = (YES, NO, SKIP)
ESTIMATE, IMPROVE, IMPORT = "estimate", "improve", "import"
QUEUES = (ESTIMATE, IMPROVE, IMPORT)
NO_REVIEW_LABELS = "no-review-labels"  # the store's data version while it holds no yes/no verdict


class ReviewLabelsError(ValueError):
    """A verdict that cannot be stored, or a labels store that cannot be read; the message says why."""


@dataclass(frozen=True)
class VerdictRecord:
    """One stored record: a verdict, or an undo of one (`undoes`)."""

    record_id: int
    request_id: str
    path: str
    batch: str
    category: str
    verdict: str
    queue: str
    model: str | None
    prompt_version: str | None
    reviewer: str | None
    recorded_at: str
    undoes: int | None


_COLUMNS = tuple(f.name for f in fields(VerdictRecord))

SCHEMA_SQL = f"""
CREATE TABLE IF NOT EXISTS verdicts (
    record_id INTEGER PRIMARY KEY AUTOINCREMENT,   -- in the order the records were stored
    request_id TEXT NOT NULL UNIQUE,               -- the client's: a retried request stores nothing new
    path TEXT NOT NULL,                            -- relative to the image root, as in the manifest
    batch TEXT NOT NULL,
    category TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('{YES}', '{NO}', '{SKIP}', '{UNDO}')),
    queue TEXT NOT NULL CHECK (queue IN ('{ESTIMATE}', '{IMPROVE}', '{IMPORT}')),
    model TEXT,                                    -- the model identity the page showed the image with
    prompt_version TEXT,
    reviewer TEXT,                                 -- who (or which tab) gave it, if the page says
    recorded_at TEXT NOT NULL,                     -- ISO 8601, UTC
    undoes INTEGER REFERENCES verdicts(record_id), -- an undo: the record it takes back
    CHECK ((verdict = '{UNDO}') = (undoes IS NOT NULL))
);
CREATE UNIQUE INDEX IF NOT EXISTS one_undo_per_record ON verdicts(undoes) WHERE undoes IS NOT NULL;
CREATE INDEX IF NOT EXISTS verdicts_by_image ON verdicts(category, path);
"""
# Per image and category, the latest record that is neither an undo nor undone.
_CURRENT_SQL = f"""
WITH live AS (
    SELECT * FROM verdicts v
    WHERE v.verdict != '{UNDO}' AND NOT EXISTS (SELECT 1 FROM verdicts u WHERE u.undoes = v.record_id) {{where}}
)
SELECT {", ".join(_COLUMNS)} FROM (
    SELECT *, row_number() OVER (PARTITION BY path, category ORDER BY record_id DESC) AS latest FROM live
) WHERE latest = 1 ORDER BY path, category
"""


def _unreadable(store: Path, exc: Exception) -> ReviewLabelsError:
    return ReviewLabelsError(
        f"{store} is not a readable labels store ({exc}). Nothing was written to it. Move it aside and the "
        "review pages start a new one; `sqlite3 <file> .recover` gets back what is readable of it, and "
        "`import_labels` takes an exported labels file."
    )


_STORE = RecordStore(SCHEMA_SQL, _unreadable)
_write_transaction = _STORE.write_transaction


def _record(row: tuple) -> VerdictRecord:
    return VerdictRecord(*row)


def _by_request(con: sqlite3.Connection, request_id: str) -> VerdictRecord | None:
    row = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM verdicts WHERE request_id = ?", [request_id]).fetchone()
    return _record(row) if row else None


def _by_id(con: sqlite3.Connection, record_id: int) -> VerdictRecord | None:
    row = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM verdicts WHERE record_id = ?", [record_id]).fetchone()
    return _record(row) if row else None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def image_path(path: str) -> str:
    """`path` as the manifest writes it: relative to the image root, '/'-separated; refused when it
    points outside the root."""
    text = str(path).replace("\\", "/").strip()
    parts = PurePosixPath(text).parts
    if not text or text.startswith("/") or ".." in parts or len(parts) < 2:
        raise ReviewLabelsError(
            f"Image path {path!r} must be relative to the image root and start with its batch folder "
            "(e.g. 2026-01/IMG_0001.jpg), as in the manifest."
        )
    return str(PurePosixPath(*parts))


def _insert(con: sqlite3.Connection, values: dict) -> VerdictRecord:
    """Insert unless the request id is stored already; the record stored under it either way."""
    insert_once(con, "verdicts", values)
    return _by_request(con, values["request_id"])


def record_verdict(
    store: Path,
    path: str,
    category: str,
    verdict: str,
    queue: str,
    *,
    request_id: str | None = None,
    batch: str | None = None,
    model: str | None = None,
    prompt_version: str | None = None,
    reviewer: str | None = None,
) -> VerdictRecord:
    """Store one verdict (`yes`, `no` or `skip`) on image `path` for `category`, given in `queue`
    (`estimate`, `improve`, `import`); returns the stored record. It is on disk when this returns.

    `request_id`: the client's id for this click (a new one per click, the same on a retry): a request
    retried with it stores nothing new and returns the first record; the same id with a different
    verdict is refused. Without one, each call stores a new record. `batch` defaults to the path's
    first folder."""
    if verdict not in VERDICTS:
        raise ReviewLabelsError(f"A verdict is one of {', '.join(VERDICTS)}; got {verdict!r}.")
    if queue not in QUEUES:
        raise ReviewLabelsError(f"A queue is one of {', '.join(QUEUES)}; got {queue!r}.")
    if not str(category or "").strip():
        raise ReviewLabelsError("A verdict needs a category.")
    path = image_path(path)
    values = {
        "request_id": request_id or uuid.uuid4().hex,
        "path": path,
        "batch": batch or path.split("/")[0],
        "category": category.strip(),
        "verdict": verdict,
        "queue": queue,
        "model": model,
        "prompt_version": prompt_version,
        "reviewer": reviewer,
        "recorded_at": _now(),
    }
    with _write_transaction(store) as con:
        stored = _insert(con, values)
    if (stored.path, stored.category, stored.verdict, stored.queue) != (path, values["category"], verdict, queue):
        raise ReviewLabelsError(
            f"Request id {stored.request_id} was already used for record {stored.record_id} ({stored.verdict} on "
            f"{stored.path} for {stored.category}); a new click needs a new request id."
        )
    return stored


def insert_verdicts(store: Path, verdicts: list[dict]) -> int:
    """Store many verdicts (each a dict of record_verdict's arguments: request_id, path, category,
    verdict, queue, and optionally batch, model, prompt_version, reviewer) in one transaction; those
    whose request id is stored already are left out. Returns how many were stored."""
    rows = []
    for v in verdicts:
        if v["verdict"] not in VERDICTS or v["queue"] not in QUEUES or not str(v.get("category") or "").strip():
            raise ReviewLabelsError(f"Not a verdict to store: {v}.")
        path = image_path(v["path"])
        rows.append(
            {"batch": path.split("/")[0], **v, "path": path, "category": v["category"].strip(), "recorded_at": _now()}
        )
    added = 0
    with _write_transaction(store) as con:
        for values in rows:
            before = con.total_changes
            _insert(con, values)
            added += con.total_changes - before
    return added


def undo(store: Path, record_id: int, *, request_id: str | None = None, reviewer: str | None = None) -> VerdictRecord:
    """Take back verdict `record_id` with a new record; returns the undo record. Undoing a record that
    is undone already returns the undo that took it back (two tabs undoing the same click store one
    undo). An undo itself cannot be undone: record the verdict again."""
    with _write_transaction(store) as con:
        if request_id and (done := _by_request(con, request_id)) is not None:
            return done
        target = _by_id(con, int(record_id))
        if target is None:
            raise ReviewLabelsError(f"No record {record_id} in {store}: nothing to undo.")
        if target.verdict == UNDO:
            raise ReviewLabelsError(f"Record {record_id} is an undo; record the verdict again instead of undoing it.")
        return _insert_undo(con, target, request_id, reviewer)


def _insert_undo(
    con: sqlite3.Connection, target: VerdictRecord, request_id: str | None, reviewer: str | None
) -> VerdictRecord:
    con.execute(
        "INSERT INTO verdicts (request_id, path, batch, category, verdict, queue, model, prompt_version, reviewer, "
        "recorded_at, undoes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        [
            request_id or uuid.uuid4().hex,
            target.path,
            target.batch,
            target.category,
            UNDO,
            target.queue,
            target.model,
            target.prompt_version,
            reviewer,
            _now(),
            target.record_id,
        ],
    )
    row = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM verdicts WHERE undoes = ?", [target.record_id]).fetchone()
    return _record(row)


def undo_last(
    store: Path,
    *,
    reviewer: str | None = None,
    category: str | None = None,
    queue: str | None = None,
    request_id: str | None = None,
) -> VerdictRecord | None:
    """Take back the latest verdict that is not undone yet (of `reviewer`, `category`, `queue`, where
    given): each call goes one click further back. Returns the undo record, or None when there is
    nothing left to undo. With a `request_id`, a retried call returns its first undo instead of
    undoing one more."""
    conditions, params = (
        [f"v.verdict != '{UNDO}'", "NOT EXISTS (SELECT 1 FROM verdicts u WHERE u.undoes = v.record_id)"],
        [],
    )
    for column, value in (("reviewer", reviewer), ("category", category), ("queue", queue)):
        if value is not None:
            conditions.append(f"v.{column} = ?")
            params.append(value)
    if not Path(store).is_file():
        return None
    with _write_transaction(store) as con:
        if request_id and (done := _by_request(con, request_id)) is not None:
            return done
        row = con.execute(
            f"SELECT {', '.join('v.' + c for c in _COLUMNS)} FROM verdicts v WHERE {' AND '.join(conditions)} "
            "ORDER BY v.record_id DESC LIMIT 1",
            params,
        ).fetchone()
        return None if row is None else _insert_undo(con, _record(row), request_id, reviewer)


def records(store: Path) -> list[VerdictRecord]:
    """Every record, undos included, in the order they were stored."""
    return [_record(r) for r in _read(store, f"SELECT {', '.join(_COLUMNS)} FROM verdicts ORDER BY record_id", [])]


def _read(store: Path, sql: str, params: list) -> list[tuple]:
    """The rows of a query; none where there is no store yet."""
    return _STORE.read(store, sql, params)


def current_verdicts(
    store: Path, category: str | None = None, queues: Iterable[str] | None = None, batch: str | None = None
) -> dict[tuple[str, str], VerdictRecord]:
    """(path, category) -> the latest record that is not undone, skips included: what a person says
    about each image and category now. `queues`: only records given in those queues count (the
    estimate reads the estimate queue's alone); `category`, `batch`: only those."""
    where, params = "", []
    for column, value in (("category", category), ("batch", batch)):
        if value is not None:
            where += f" AND v.{column} = ?"
            params.append(value)
    if queues is not None:
        queues = list(queues)
        where += f" AND v.queue IN ({', '.join('?' for _ in queues)})"
        params += queues
    rows = _read(store, _CURRENT_SQL.format(where=where), params)
    return {(r[2], r[4]): _record(r) for r in rows}


def _labels(current: Iterable[VerdictRecord]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Per path, the categories it shows (yes) and those judged (yes or no)."""
    shows: dict[str, set[str]] = {}
    judged: dict[str, set[str]] = {}
    for r in current:
        if r.verdict in (YES, NO):
            judged.setdefault(r.path, set()).add(r.category)
            shows.setdefault(r.path, set())
            if r.verdict == YES:
                shows[r.path].add(r.category)
    return shows, judged


def review_label_rows(store: Path) -> LabelRows:
    """The store's yes/no verdicts as labels by path, each image judged on its verdicts' categories only."""
    shows, judged = _labels(current_verdicts(store).values())
    return LabelRows("path", shows, judged)


def labels_version(store: Path) -> str:
    """The store's data version: a hash of its current yes/no verdicts with their queues (a skip, or a
    verdict given and undone, changes nothing downstream), NO_REVIEW_LABELS when it has none."""
    current = [r for r in current_verdicts(store).values() if r.verdict in (YES, NO)]
    if not current:
        return NO_REVIEW_LABELS
    digest = hashlib.sha256()
    for r in current:  # sorted by path, category
        digest.update(f"{r.path}\t{r.category}\t{r.verdict}\t{r.queue}\n".encode())
    return digest.hexdigest()[:SOURCE_VERSION_CHARS]
