"""A durable store of records people make one click at a time: a SQLite file in WAL mode.

What the review pages' labels (clip_assets.tuning.review_labels) and the near-duplicate page's
choices (clip_assets.search.duplicate_choices) share. Each store is its own file with its own tables;
records are appended and never changed (an undo is a record too). Why SQLite rather than the DuckDB
warehouse: DuckDB lets a file be open by one writing process or by readers, never both, and the
pipeline holds it for whole batches, so a click could wait minutes. SQLite in WAL mode lets any
number of processes read while one writes, and each click is a transaction of a few milliseconds;
`synchronous=FULL` makes a click durable (on disk) before it is acknowledged. Writers wait for each
other (`BEGIN IMMEDIATE`, a busy timeout), so two tabs or two people at once both land.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another's transaction (each lasts milliseconds)


@dataclass(frozen=True)
class RecordStore:
    """One kind of store: its tables (created on the first write) and the error that names a file
    that is not one."""

    schema_sql: str
    unreadable: Callable[[Path, Exception], Exception]

    @contextlib.contextmanager
    def connect(self, store: Path, write: bool) -> Iterator[sqlite3.Connection]:
        """A connection to the store (created on the first write), closed on exit; a file that is not
        such a store is refused naming it."""
        store = Path(store)
        if write:
            store.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = sqlite3.connect(store, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise self.unreadable(store, exc) from exc
        try:
            try:
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("PRAGMA synchronous=FULL")  # a click is on disk before it is acknowledged
                if write:
                    con.executescript(self.schema_sql)
            except sqlite3.DatabaseError as exc:
                raise self.unreadable(store, exc) from exc
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def write_transaction(self, store: Path) -> Iterator[sqlite3.Connection]:
        """One writer at a time (BEGIN IMMEDIATE waits up to BUSY_TIMEOUT_S for another's commit)."""
        with self.connect(store, write=True) as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def read(self, store: Path, sql: str, params: list) -> list[tuple]:
        """The rows of a query; none where there is no store yet (or it was created and never written)."""
        if not Path(store).is_file():
            return []
        with self.connect(store, write=False) as con:
            try:
                return con.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise self.unreadable(Path(store), exc) from exc
            except sqlite3.DatabaseError as exc:
                raise self.unreadable(Path(store), exc) from exc


def insert_once(con: sqlite3.Connection, table: str, values: dict) -> None:
    """Insert a record unless its `request_id` is stored already (a retried click lands once)."""
    names = list(values)
    con.execute(
        f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)}) "
        "ON CONFLICT (request_id) DO NOTHING",
        [values[n] for n in names],
    )
