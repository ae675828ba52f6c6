"""Which file of each near-duplicate group a person keeps, stored one click at a time, and the files
that leaves to delete or move (`<data dir>/labels/duplicate_choices.sqlite`).

A choice is a record appended to one SQLite table and never changed (the same durable store as the
review pages' labels: clip_assets.storage.record_store): the group (its id and tier), the path kept,
the paths of the group as the person saw it, the time, who (optional), a record id and the client's
request id (a retried request lands once). An undo is a record too (`undoes` = the choice it takes
back), so the whole history can be read back.

The current choice of a group is its latest choice that is not undone. The files to remove are, for
each group DuckDB holds now (duplicate_groups) whose current choice keeps one of its files, the other
files of the group that the person saw: a file that joined the group after the choice is not listed
until the group is chosen again. The project never deletes or moves an image itself: it writes the
list (`clip-assets duplicates export`, the page's download) for a person to act on.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import sqlite3
import uuid
from dataclasses import dataclass, fields
from pathlib import Path

from clip_assets.storage.record_store import RecordStore, insert_once
from clip_assets.tuning.review_labels import ReviewLabelsError, image_path

KEEP, UNDO = "keep", "undo"


class DuplicateChoiceError(ValueError):
    """A choice that cannot be stored, or a choices store that cannot be read; the message says why."""


@dataclass(frozen=True)
class ChoiceRecord:
    record_id: int
    request_id: str
    group_id: str
    tier: str
    action: str  # keep, or undo
    keep: str  # the path kept
    members: str  # JSON list of the group's paths as the person saw it
    reviewer: str | None
    recorded_at: str
    undoes: int | None

    @property
    def member_paths(self) -> list[str]:
        return json.loads(self.members)


_COLUMNS = tuple(f.name for f in fields(ChoiceRecord))

SCHEMA_SQL = f"""
CREATE TABLE IF NOT EXISTS choices (
    record_id INTEGER PRIMARY KEY AUTOINCREMENT,   -- in the order the records were stored
    request_id TEXT NOT NULL UNIQUE,               -- the client's: a retried request stores nothing new
    group_id TEXT NOT NULL,                        -- duplicate_groups.group_id: its first image's id
    tier TEXT NOT NULL,                            -- exact, copy or look-alike
    action TEXT NOT NULL CHECK (action IN ('{KEEP}', '{UNDO}')),
    keep TEXT NOT NULL,                            -- the path kept, relative to the image root
    members TEXT NOT NULL,                         -- JSON list: the group's paths as the person saw it
    reviewer TEXT,
    recorded_at TEXT NOT NULL,                     -- ISO 8601, UTC
    undoes INTEGER REFERENCES choices(record_id),  -- an undo: the choice it takes back
    CHECK ((action = '{UNDO}') = (undoes IS NOT NULL))
);
CREATE UNIQUE INDEX IF NOT EXISTS one_undo_per_choice ON choices(undoes) WHERE undoes IS NOT NULL;
CREATE INDEX IF NOT EXISTS choices_by_group ON choices(group_id);
"""
_CURRENT_SQL = f"""
SELECT {", ".join(_COLUMNS)} FROM (
    SELECT *, row_number() OVER (PARTITION BY group_id ORDER BY record_id DESC) AS latest FROM choices c
    WHERE c.action = '{KEEP}' AND NOT EXISTS (SELECT 1 FROM choices u WHERE u.undoes = c.record_id)
) WHERE latest = 1 ORDER BY group_id
"""


def _unreadable(store: Path, exc: Exception) -> DuplicateChoiceError:
    return DuplicateChoiceError(
        f"{store} is not a readable duplicate choices store ({exc}). Nothing was written to it. Move it aside "
        "and the near-duplicate page starts a new one; `sqlite3 <file> .recover` gets back what is readable of it."
    )


_STORE = RecordStore(SCHEMA_SQL, _unreadable)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _select(con: sqlite3.Connection, where: str, params: list) -> ChoiceRecord | None:
    row = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM choices WHERE {where}", params).fetchone()
    return ChoiceRecord(*row) if row else None


def _checked(group_id: str, tier: str, keep: str, members: list[str]) -> dict:
    try:
        paths = [image_path(m) for m in members]
        kept = image_path(keep)
    except ReviewLabelsError as exc:
        raise DuplicateChoiceError(str(exc)) from None
    if not str(group_id or "").strip():
        raise DuplicateChoiceError("A choice needs the group's id.")
    if kept not in paths:
        raise DuplicateChoiceError(f"{kept} is not a file of group {group_id} ({', '.join(paths)}): it cannot be kept.")
    return {"group_id": group_id, "tier": tier, "keep": kept, "members": json.dumps(sorted(set(paths)))}


def _insert(con: sqlite3.Connection, values: dict) -> ChoiceRecord:
    insert_once(con, "choices", values)
    return _select(con, "request_id = ?", [values["request_id"]])


def record_choices(store: Path, choices: list[dict], reviewer: str | None = None) -> list[ChoiceRecord]:
    """Store choices (each a dict: group_id, tier, keep, members and optionally request_id) in one
    transaction; returns the stored records. A choice whose request id is stored already stores
    nothing new (a retry); the same id for another choice is refused."""
    rows = [
        {
            "request_id": c.get("request_id") or uuid.uuid4().hex,
            **_checked(c["group_id"], c["tier"], c["keep"], list(c["members"])),
            "action": KEEP,
            "reviewer": reviewer,
            "recorded_at": _now(),
        }
        for c in choices
    ]
    with _STORE.write_transaction(store) as con:
        stored = [_insert(con, row) for row in rows]
    for row, record in zip(rows, stored):
        if (record.group_id, record.keep, record.action) != (row["group_id"], row["keep"], KEEP):
            raise DuplicateChoiceError(
                f"Request id {record.request_id} was already used for record {record.record_id}; a new click "
                "needs a new request id."
            )
    return stored


def record_choice(
    store: Path,
    group_id: str,
    tier: str,
    keep: str,
    members: list[str],
    request_id: str | None = None,
    reviewer: str | None = None,
) -> ChoiceRecord:
    """Store that `keep` is the file of group `group_id` (whose files the person saw: `members`) to keep."""
    return record_choices(
        store,
        [{"group_id": group_id, "tier": tier, "keep": keep, "members": members, "request_id": request_id}],
        reviewer,
    )[0]


def undo(store: Path, record_id: int, request_id: str | None = None, reviewer: str | None = None) -> ChoiceRecord:
    """Take back choice `record_id` with a new record; returns the undo record (the same one when the
    choice is undone already)."""
    with _STORE.write_transaction(store) as con:
        if request_id and (done := _select(con, "request_id = ?", [request_id])) is not None:
            return done
        target = _select(con, "record_id = ?", [int(record_id)])
        if target is None:
            raise DuplicateChoiceError(f"No choice {record_id} in {store}: nothing to undo.")
        if target.action == UNDO:
            raise DuplicateChoiceError(f"Record {record_id} is an undo; choose again instead of undoing it.")
        con.execute(
            "INSERT INTO choices (request_id, group_id, tier, action, keep, members, reviewer, recorded_at, undoes) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [
                request_id or uuid.uuid4().hex,
                target.group_id,
                target.tier,
                UNDO,
                target.keep,
                target.members,
                reviewer,
                _now(),
                target.record_id,
            ],
        )
        return _select(con, "undoes = ?", [target.record_id])


def records(store: Path) -> list[ChoiceRecord]:
    """Every record, undos included, in the order they were stored."""
    return [
        ChoiceRecord(*r)
        for r in _STORE.read(store, f"SELECT {', '.join(_COLUMNS)} FROM choices ORDER BY record_id", [])
    ]


def current_choices(store: Path) -> dict[str, ChoiceRecord]:
    """group_id -> its latest choice that is not undone."""
    return {r[2]: ChoiceRecord(*r) for r in _STORE.read(store, _CURRENT_SQL, [])}


EXPORT_COLUMNS = ("path", "keep", "tier", "group_id", "chosen_at")
TIERS = ("exact", "copy", "look-alike")  # clip_assets.search.near_duplicates.TIERS
DEFAULT_REMOVAL_TIERS = ("exact", "copy")  # look-alikes are similar pictures, not copies: only when asked


def removal_tiers(raw: str | None) -> tuple[str, ...]:
    """The tiers named in `raw` (comma-separated; None or empty: DEFAULT_REMOVAL_TIERS)."""
    tiers = tuple(t.strip() for t in (raw or ",".join(DEFAULT_REMOVAL_TIERS)).split(",") if t.strip())
    if not tiers or any(t not in TIERS for t in tiers):
        raise ValueError(f"tiers are some of {', '.join(TIERS)}, comma-separated; got {raw!r}")
    return tiers


@dataclass
class Removals:
    """The files a person's choices leave to delete or move, and the choices that name no group now."""

    rows: list[dict]  # EXPORT_COLUMNS
    stale_choices: int  # choices whose group is gone, or no longer holds the file kept
    groups_chosen: int


def files_to_remove(store: Path, groups: list[dict], tiers: tuple[str, ...] | None = None) -> Removals:
    """From the rows of duplicate_groups (dicts with group_id, tier, path), the files to remove: per
    group of `tiers` (None: all) whose current choice keeps one of its files, the others the person saw."""
    by_group: dict[str, list[dict]] = {}
    for row in groups:
        by_group.setdefault(row["group_id"], []).append(row)
    out, stale, chosen = [], 0, 0
    for group_id, choice in current_choices(store).items():
        members = by_group.get(group_id)
        paths = {m["path"] for m in members or []}
        if not members or choice.keep not in paths:
            stale += 1
            continue
        tier = members[0]["tier"]
        if tiers is not None and tier not in tiers:
            continue
        chosen += 1
        seen = set(choice.member_paths)
        for m in members:
            if m["path"] != choice.keep and m["path"] in seen:
                out.append(
                    {
                        "path": m["path"],
                        "keep": choice.keep,
                        "tier": tier,
                        "group_id": group_id,
                        "chosen_at": choice.recorded_at,
                    }
                )
    out.sort(key=lambda r: r["path"])
    return Removals(out, stale, chosen)


def removals_csv(removals: Removals) -> str:
    """The files to delete or move, one a line (EXPORT_COLUMNS), as CSV text."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(removals.rows)
    return buf.getvalue()
