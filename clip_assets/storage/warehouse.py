"""The DuckDB file: prompt centroids and classifications, written in whole transactions.

Or, with CLIP_ASSETS_WAREHOUSE=parquet (writers on several machines), parquet files with DuckDB views
over them (clip_assets.storage.parquet_warehouse): the same functions, the same tables and views.

Nothing else in the project opens the file: every reader and writer goes through `connect`. DuckDB
lets a file be open in one read-write process or in any number of read-only ones, never both, so
connections are opened briefly, both kinds wait (with a bound) for another process's conflicting
lock to go, and every write replaces whole units (all centroids, or one batch's classifications)
inside a single transaction: readers never see a half-written batch.

The file is written in DuckDB 1.4's storage format (`STORAGE_VERSION`), which the DuckDB 1.x that
other tools ship can open, not in DuckDB 2's own; a writer that finds a file in a newer format rewrites
it once in this one (`_rewrite_in_storage_version`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from clip_assets.classification.centroids import KINDS, CentroidSet
from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import default
from clip_assets.storage import parquet_warehouse
from clip_assets.storage.atomic_files import atomic_write, disk_full_error, is_out_of_space
from clip_assets.storage.damaged_files import DUCKDB, DamagedFileError, materialize, move_aside
from clip_assets.storage.warehouse_schema import SCHEMA_SQL

log = logging.getLogger(__name__)


class CentroidsMissingError(LookupError):
    """Classification was asked for before any prompt centroids were stored."""


class WarehouseLockedError(RuntimeError):
    """Another process held the DuckDB file for longer than this one could wait; says who and what to do."""


class WarehouseVersionError(RuntimeError):
    """The DuckDB file was written by a DuckDB release whose storage format this one cannot read."""


# DuckDB's message names the process holding the lock: "... Conflicting lock is held in <exe> (PID 123) ..."
_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (?P<exe>.*?) \(PID (?P<pid>\d+)\)")
_IS_LOCK_ERROR = re.compile(r"could not set lock|conflicting lock", re.IGNORECASE)
_STORAGE_VERSION = re.compile(r"database file with version number (\d+)")


def _lock_holder(duckdb_message: str) -> str:
    """'PID 123 (python notebook.py)' from DuckDB's lock error, with the command line where /proc shows it."""
    found = _LOCK_HOLDER.search(duckdb_message)
    if not found:
        return "another process"
    pid, command = found["pid"], found["exe"]
    with contextlib.suppress(OSError):  # no /proc, or not ours to read: keep DuckDB's executable name
        # Only the same process DuckDB saw (a PID from another machine's lock may name a local one).
        if os.readlink(f"/proc/{pid}/exe") == command:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            command = " ".join(a.decode(errors="replace") for a in args)[:300] or command
    return f"PID {pid} ({command})"


def _holder_mode(read_only: bool, duckdb_message: str) -> str:
    if read_only:
        return "for writing"  # only a writer keeps a reader out
    return "read-only" if "read-only mode" in duckdb_message else "for writing"  # DuckDB hints when readers hold it


def _locked_message(path: Path, read_only: bool, waited_s: float, duckdb_message: str) -> str:
    return (
        f"{path} is held {_holder_mode(read_only, duckdb_message)} by {_lock_holder(duckdb_message)}: waited "
        f"{waited_s:.1f} s (CLIP_ASSETS_DUCKDB_WAIT_S) to open it {'read-only' if read_only else 'for writing'}. "
        "DuckDB lets a file be open in one process that writes, or in any number of processes that only "
        "read, never both: a connection left open elsewhere, even a read-only one, keeps the pipeline's "
        "writers out, and a writer keeps every other process out. If it is a notebook or a dashboard, "
        "close its connection (con.close()), open the file only for the length of a query "
        "(`with duckdb.connect(path, read_only=True) as con: ...`), or read the per-batch parquet files "
        "instead. If it is a pipeline step writing a large batch, let it finish, or raise "
        "CLIP_ASSETS_DUCKDB_WAIT_S."
    )


def _is_damage(path: Path, exc: duckdb.Error) -> bool:
    """Whether DuckDB's error says the file itself is damaged (not a lock, a version, a query's mistake)."""
    message = str(exc)
    if "Corrupt database file" in message or "not a valid DuckDB database file" in message:
        return True
    return "Could not read enough bytes" in message and path.name in message  # cut short


@contextlib.contextmanager
def _named_if_damaged(path: Path) -> Iterator[None]:
    """DuckDB's errors for a damaged file, at open or in any query, as DamagedFileError: the file and what rebuilds it."""
    try:
        yield
    except duckdb.Error as exc:
        if _is_damage(path, exc):
            raise DUCKDB.damaged(path, exc) from exc
        raise


# The file's three header blocks; its data blocks follow, each `block_size` bytes (DuckDB's storage layout).
_HEADER_BYTES = 3 * 4096


def _check_not_cut_short(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """A file too short to hold the blocks in use its header counts was cut short: raise now, not at the
    first query that reaches past its end (a writer would otherwise write into it, and the damage show
    only later). Free blocks are left out of the count: DuckDB itself cuts those off the end of the file."""
    rows = con.execute(  # fetched whole: a result left unfinished would hold up the connection's next use
        "SELECT block_size, used_blocks FROM pragma_database_size() WHERE database_name = current_database()"
    ).fetchall()
    if not rows:
        return
    row = rows[0]
    expected = _HEADER_BYTES + int(row[0]) * int(row[1])
    size = path.stat().st_size
    if size < expected:
        raise DUCKDB.damaged(path, f"cut short: {size:,} bytes, where its {row[1]} blocks in use take {expected:,}")


def set_aside_damaged(path: Path, damage: DamagedFileError) -> str:
    """Move a damaged DuckDB file (and its write-ahead log) aside, so a writer starts a new one; the
    warning, also logged: every batch's classifications are to be materialized again."""
    moved = DUCKDB.set_aside(path, damage.reason)
    wal = path.with_name(path.name + ".wal")
    if wal.exists():
        move_aside(wal)
    warning = (
        f"{moved}. The new file holds none of the old classifications: materialize image_classifications for "
        f"every batch ({materialize('image_classifications')} --partition-range <first batch>...<last batch>, or "
        "a backfill in the UI), then near_duplicates; nothing is re-encoded"
    )
    log.warning(warning)
    return warning


# The storage format of the files DuckDB creates here: DuckDB 1.4's (its storage version 67), which DuckDB
# 1.4, 1.5 (the `duckdb` CLI and Python package other tools ship) and 2.x all open. DuckDB 2's own format
# (its default) is refused by every 1.x ("Trying to read a database file with version number ...");
# 1.5's (68) by DuckDB 1.4, the long-term-support release. DuckDB keeps a file's format when it opens
# it, so this applies to new files; `connect` rewrites an older one. docs/data.md says it to users.
STORAGE_VERSION = "v1.4.0"
_CONFIG = {"storage_compatibility_version": STORAGE_VERSION}
# The rewrite's own connection differs from every other one in a setting DuckDB compares: should another
# connection of this process still hold the file (DuckDB shares one database per path and process),
# opening it fails at once and the file is left as it is, instead of being replaced under that connection.
_REWRITE_CONFIG = {**_CONFIG, "checkpoint_threshold": "1GB"}
# Files whose rewrite failed in this process: not tried again by each of its writers (the next process does).
_rewrite_failed: set[Path] = set()


def _open(path: Path, read_only: bool, wait_s: float, config: dict[str, object] = _CONFIG) -> duckdb.DuckDBPyConnection:
    started = time.monotonic()
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=config)
        except duckdb.IOException as exc:
            message = str(exc)
            version = _STORAGE_VERSION.search(message)
            if version:
                raise WarehouseVersionError(
                    f"{path} was written by a newer DuckDB (storage version {version[1]}) than this project's "
                    f"DuckDB {duckdb.__version__} reads. It holds only what the parquet files give: move it "
                    "aside, materialize prompt_centroids and backfill image_classifications (nothing is "
                    "re-encoded)."
                ) from exc
            if not _IS_LOCK_ERROR.search(message):
                raise
            waited = time.monotonic() - started
            if waited >= wait_s:
                raise WarehouseLockedError(_locked_message(path, read_only, waited, message)) from exc
            time.sleep(min(delay, wait_s - waited))
            delay = min(delay * 2, 1.0)


def _version(tag: str) -> tuple[int, ...]:
    """(2, 0, 0) from DuckDB's storage version tag 'v2.0.0+' (or the setting's 'v1.4.0')."""
    return tuple(int(part) for part in re.findall(r"\d+", tag)[:3])


def file_storage_version(con: duckdb.DuckDBPyConnection) -> str:
    """The storage format of the connection's file as DuckDB tags it: 'v1.4.0+' (DuckDB 1.4 and later read it)."""
    rows = con.execute(
        "SELECT tags['storage_version'] FROM duckdb_databases() WHERE database_name = current_database()"
    ).fetchall()
    return str(rows[0][0]) if rows and rows[0][0] else ""


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _rewrite_in_storage_version(path: Path, wait_s: float) -> None:
    """Rewrite a file in a storage format newer than STORAGE_VERSION in that one, in place.

    Under the file's write lock: its write-ahead log checkpointed, then every table (rows, defaults,
    constraints) and view copied into a temp file next to it created in STORAGE_VERSION, which is
    synced and renamed over the file before the lock is let go; so no writer's rows land in the old
    file after the copy began, and the old file stays whole until the new one is. A failure (a full
    disk, another connection of this process holding the file) removes the temp file, leaves the old
    one as it was (DuckDB 2 reads and writes it as before) and is logged, with the SQL to run by hand.
    """
    started = time.monotonic()
    con = _open(path, False, wait_s, _REWRITE_CONFIG)
    try:
        before = file_storage_version(con)
        if not before or _version(before) <= _version(STORAGE_VERSION):
            return  # another process rewrote it meanwhile
        con.execute("SET enable_progress_bar = false")
        con.execute("CHECKPOINT")
        source = con.execute("SELECT current_database()").fetchone()[0]
        target = _quoted("clip_assets_rewrite")
        with atomic_write(path, durable=True) as tmp:
            try:
                con.execute(f"ATTACH {_text(str(tmp))} AS {target} (STORAGE_VERSION {_text(STORAGE_VERSION)})")
                con.execute(f"COPY FROM DATABASE {_quoted(source)} TO {target}")
                con.execute(f"DETACH {target}")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    con.execute(f"DETACH {target}")
                raise
            finally:
                tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)
    finally:
        con.close()  # after the rename: the old file's lock held until then, and nothing written to it since
    log.warning(
        "%s was in DuckDB's storage format %s, which DuckDB 1.x cannot open: rewritten in %s's "
        "(%.1f MB, %.1f s); DuckDB 1.4 and later read it now",
        path,
        before,
        STORAGE_VERSION,
        path.stat().st_size / 1e6,
        time.monotonic() - started,
    )


def _in_storage_version(con: duckdb.DuckDBPyConnection, path: Path, wait_s: float) -> duckdb.DuckDBPyConnection:
    """A writer's connection to `path`, rewritten first in STORAGE_VERSION if it is in a newer format."""
    version = file_storage_version(con)
    if not version or _version(version) <= _version(STORAGE_VERSION) or path in _rewrite_failed:
        return con
    con.close()
    try:
        _rewrite_in_storage_version(path, wait_s)
    except (duckdb.Error, OSError) as exc:
        if isinstance(exc, duckdb.Error) and _is_damage(path, exc):
            raise
        _rewrite_failed.add(path)
        log.warning(
            "%s stays in DuckDB's storage format %s, which DuckDB 1.x cannot open (this DuckDB reads and "
            "writes it as before): rewriting it in %s's failed: %s. The next process that writes it tries "
            "again; by hand, with nothing else holding it: duckdb.connect('%s') then ATTACH 'new.duckdb' "
            "(STORAGE_VERSION '%s'); COPY FROM DATABASE <its name> TO new; and move new.duckdb over it",
            path,
            version,
            STORAGE_VERSION,
            exc,
            path,
            STORAGE_VERSION,
        )
    return _open(path, False, wait_s)


# DuckDB keeps the blocks a query read cached up to its memory limit (80% of RAM by default): a pass
# over a whole collection's classifications then holds about as much memory as the rows take on disk
# (+0.9 GiB at 1M images x 50 categories). Readers that pass over every row and keep little (the
# gallery's best-n lists, the labelled sample's rows) cap it, and with it their peak memory.
COLLECTION_PASS_MEMORY_LIMIT = "256MB"

# How long connect() waits for another process's lock: CLIP_ASSETS_DUCKDB_WAIT_S, set once by the process's
# edge (clip_assets.process.configure_process), never read from the environment here.
lock_wait_s: float = default("duckdb_wait_s")


def configure_lock_wait(seconds: float) -> None:
    global lock_wait_s
    lock_wait_s = seconds


# Where the warehouse is: "duckdb" (the file at the path every function here takes) or "parquet" (parquet
# files under `tables_dir(path)`, clip_assets.storage.parquet_warehouse). CLIP_ASSETS_WAREHOUSE, set once
# by the process's edge (clip_assets.process.configure_process), never read from the environment here.
warehouse_kind: str = default("warehouse")


def configure_warehouse(kind: str) -> None:
    global warehouse_kind
    warehouse_kind = kind


def tables_dir(path: Path) -> Path:
    """Where the parquet warehouse beside the DuckDB file `path` keeps its files (`<data dir>/warehouse`)."""
    return DataLayout(Path(path).parent).warehouse_dir


def exists(path: Path) -> bool:
    """Whether the warehouse holds anything: the DuckDB file is there, or the parquet warehouse's prompts file."""
    if warehouse_kind == "parquet":
        return parquet_warehouse.exists(tables_dir(path))
    return Path(path).is_file()


@contextlib.contextmanager
def connect(
    path: Path, read_only: bool = False, wait_s: float | None = None, memory_limit: str | None = None,
    classifications: bool = True,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """The one way into the DuckDB file, for readers and writers alike: open it, closed on exit.

    While another process holds a lock that conflicts (a writer, for anyone; a reader, for a writer),
    this waits up to `wait_s` seconds (default: `lock_wait_s`, the CLIP_ASSETS_DUCKDB_WAIT_S setting), then raises
    WarehouseLockedError naming the process. A writer creates the file and the tables if needed, in
    STORAGE_VERSION's format, and rewrites a file in a newer one in that format first. A
    damaged file, at open or in a query, raises DamagedFileError (clip_assets.storage.damaged_files).
    `memory_limit` (e.g. COLLECTION_PASS_MEMORY_LIMIT): DuckDB's memory limit for this connection's
    database (its block cache included).

    With CLIP_ASSETS_WAREHOUSE=parquet a reader gets an in-memory DuckDB with the same tables and views
    over the parquet files beside `path` (clip_assets.storage.parquet_warehouse), and no lock to wait for;
    `classifications` False leaves its image_classifications empty, so a reader of the prompts alone
    fetches no batch's file from a store (the DuckDB file holds them all, so there it changes nothing).
    """
    path = Path(path)
    if warehouse_kind == "parquet":
        if not read_only:
            raise RuntimeError("the parquet warehouse is written only by the replace_* functions, never through SQL")
        with parquet_warehouse.reader(tables_dir(path), memory_limit, classifications) as con:
            yield con
        return
    if wait_s is None:
        wait_s = lock_wait_s
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    with _named_if_damaged(path):
        con = _open(path, read_only, wait_s)
    try:
        with _named_if_damaged(path):
            _check_not_cut_short(con, path)
            if not read_only:
                con = _in_storage_version(con, path, wait_s)
            if memory_limit is not None:
                con.execute(f"SET memory_limit = '{memory_limit}'")
            if not read_only:
                con.execute(SCHEMA_SQL)
            yield con
    except duckdb.Error as exc:
        if is_out_of_space(exc):  # DuckDB rolled the transaction back: the stored rows are as they were
            raise disk_full_error(path, exc) from exc
        raise
    finally:
        con.close()


@contextlib.contextmanager
def _transaction(con: duckdb.DuckDBPyConnection):
    con.begin()
    try:
        yield
    except BaseException:
        con.rollback()
        raise
    con.commit()


def replace_centroids(path: Path, centroids: CentroidSet) -> int:
    """Replace every stored centroid and category setting at once; returns centroid rows written. A
    damaged DuckDB file is moved aside first and a new one started (see set_aside_damaged)."""
    rows = {k: [] for k in ("category", "kind", "vector", "prompt_count", "prompt_hash")}
    for i, name in enumerate(centroids.categories):
        for kind in KINDS:
            if (name, kind) in centroids.prompt_counts:
                rows["category"].append(name)
                rows["kind"].append(kind)
                rows["vector"].append(getattr(centroids, kind)[i].tolist())
                rows["prompt_count"].append(centroids.prompt_counts[(name, kind)])
                rows["prompt_hash"].append(centroids.prompt_hashes[(name, kind)])
    n = len(rows["category"])
    centroid_rows = pa.table(
        {
            **{k: v for k, v in rows.items() if k != "vector"},
            "vector": pa.array(rows["vector"], pa.list_(pa.float32())),
            "model": [centroids.model] * n,
            "prompt_version": [centroids.prompt_version] * n,
        }
    )
    c = len(centroids.categories)
    category_rows = pa.table(
        {
            "category": centroids.categories,
            "position": list(range(c)),
            "source": centroids.sources,
            "mode": centroids.modes,
            "threshold": centroids.thresholds,
            "neutral_margin": centroids.neutral_margins,
            "top_k": centroids.top_k,
            "logit_scale": [centroids.logit_scale] * c,
            "model": [centroids.model] * c,
            "prompt_version": [centroids.prompt_version] * c,
        }
    )

    if warehouse_kind == "parquet":
        parquet_warehouse.replace_prompts(tables_dir(path), centroid_rows, category_rows)
        return n

    def write() -> None:
        with connect(path) as con, _transaction(con):
            con.execute("DELETE FROM prompt_centroids")
            con.execute("DELETE FROM prompt_categories")
            con.register("new_centroids", centroid_rows)
            con.register("new_categories", category_rows)
            con.execute(
                "INSERT INTO prompt_centroids SELECT category, kind, vector, prompt_count, prompt_hash, "
                "model, prompt_version FROM new_centroids"
            )
            con.execute("INSERT INTO prompt_categories BY NAME SELECT * FROM new_categories")

    try:
        write()
    except DamagedFileError as damage:  # the step that starts the file: a damaged one is set aside and begun anew
        set_aside_damaged(Path(path), damage)
        write()
    return n


def read_centroids(path: Path) -> CentroidSet:
    """The stored centroids as matrices, in the prompt files' category order."""
    if not exists(path):
        where = tables_dir(path) if warehouse_kind == "parquet" else path
        raise CentroidsMissingError(
            f"No prompt centroids at {where}: materialize prompt_centroids before image_classifications."
        )
    with connect(path, read_only=True, classifications=False) as con:  # a reader: never takes the write lock
        cats = con.execute(
            "SELECT category, source, threshold, neutral_margin, model, prompt_version, mode, top_k, "
            "logit_scale FROM prompt_categories ORDER BY position"
        ).fetchall()
        rows = con.execute("SELECT category, kind, vector, prompt_count, prompt_hash FROM prompt_centroids").fetchall()
    if not cats:
        raise CentroidsMissingError(
            f"No prompt centroids in {path}: materialize prompt_centroids before image_classifications."
        )
    names = [r[0] for r in cats]
    index = {name: i for i, name in enumerate(names)}
    dim = len(rows[0][2])
    mats = {kind: np.zeros((len(names), dim), dtype=np.float32) for kind in KINDS}
    has = {kind: np.zeros(len(names), dtype=bool) for kind in KINDS}
    counts, hashes = {}, {}
    for category, kind, vector, count, digest in rows:
        mats[kind][index[category]] = np.asarray(vector, dtype=np.float32)
        has[kind][index[category]] = True
        counts[(category, kind)] = count
        hashes[(category, kind)] = digest
    return CentroidSet(
        categories=names,
        sources=[r[1] for r in cats],
        thresholds=np.array([r[2] for r in cats], dtype=np.float64),
        neutral_margins=np.array([r[3] for r in cats], dtype=np.float64),
        positive=mats["positive"],
        negative=mats["negative"],
        neutral=mats["neutral"],
        has_negative=has["negative"],
        has_neutral=has["neutral"],
        modes=[r[6] for r in cats],
        top_k=np.array([r[7] for r in cats], dtype=np.int64),
        logit_scale=float(cats[0][8]),
        prompt_counts=counts,
        prompt_hashes=hashes,
        model=cats[0][4],
        prompt_version=cats[0][5],
    )


def replace_batch_classifications(path: Path, batch: str, rows: pa.RecordBatchReader) -> int:
    """Swap one batch's rows for new ones in a single transaction: no duplicates, no half batch.

    `rows` is one Arrow stream, consumed by a single INSERT inside the transaction, so a batch never
    has to sit in memory whole. Returns the number of rows written. In a parquet warehouse the batch's
    file is replaced instead, as a whole.
    """
    if warehouse_kind == "parquet":
        return parquet_warehouse.replace_batch(tables_dir(path), batch, rows)
    with connect(path) as con, _transaction(con):
        con.execute("DELETE FROM image_classifications WHERE batch = ?", [batch])
        con.register("new_rows", rows)
        written = con.execute("INSERT INTO image_classifications BY NAME SELECT * FROM new_rows").fetchone()[0]
        con.unregister("new_rows")
    return int(written)


def replace_duplicate_groups(path: Path, rows: pa.Table) -> int:
    """Replace every near-duplicate group at once (groups span batches, so they are replaced whole)."""
    if warehouse_kind == "parquet":
        parquet_warehouse.replace_duplicate_groups(tables_dir(path), rows)
        return rows.num_rows
    with connect(path) as con, _transaction(con):
        con.execute("DELETE FROM duplicate_groups")
        con.register("new_groups", rows)
        con.execute("INSERT INTO duplicate_groups BY NAME SELECT * FROM new_groups")
        con.unregister("new_groups")
    return rows.num_rows


DUPLICATE_GROUP_COLUMNS = ("group_id", "position", "image_id", "path", "batch", "similarity", "tier", "same_bytes",
                           "hash_distance", "width", "height", "file_size", "mtime", "suggested_keep")


def read_duplicate_groups(path: Path, limit_groups: int, tiers: tuple[str, ...] | None = None) -> list[dict]:
    """The rows (DUPLICATE_GROUP_COLUMNS) of the `limit_groups` largest groups of each of `tiers` (None:
    every tier), tier by tier (exact, copy, look-alike), largest first, first image first."""
    tier_filter = "" if tiers is None else f"WHERE tier IN ({', '.join('?' for _ in tiers)})"
    with connect(path, read_only=True) as con:
        rows = con.execute(
            f"""
            SELECT {', '.join('d.' + c for c in DUPLICATE_GROUP_COLUMNS)}
            FROM duplicate_groups d JOIN (
                SELECT group_id, images, row_number() OVER (PARTITION BY tier ORDER BY images DESC, group_id) AS n
                FROM near_duplicate_groups {tier_filter}
            ) g USING (group_id)
            WHERE g.n <= ?
            ORDER BY CASE d.tier WHEN 'exact' THEN 0 WHEN 'copy' THEN 1 ELSE 2 END, g.images DESC, d.group_id, d.position
            """,
            [*(tiers or ()), limit_groups],
        ).fetchall()
    return [dict(zip(DUPLICATE_GROUP_COLUMNS, r)) for r in rows]
