"""The warehouse as parquet files (CLIP_ASSETS_WAREHOUSE=parquet): writers on several machines at once.

The DuckDB file takes one writer at a time, on one machine. Here every unit a step replaces whole is
a file of its own under `<data dir>/warehouse/`, written by `atomic_files` (a temp file renamed into
place; in a data directory kept in an object store, one PUT of the finished file first):

    classifications/<batch>.parquet   one batch's image_classifications rows
    prompts.parquet                   prompt_centroids and prompt_categories together (`row_of` says
                                      which), so a reader never sees one prompt version's centroids
                                      with another's categories
    duplicate_groups.parquet          every near-duplicate group

So writers of different batches never touch the same file and need no lock, a batch written again
replaces only itself, and a reader sees each file whole, old or new. A reader gets an in-memory
DuckDB whose views carry the tables' names and columns (their types cast to the DuckDB file's) over
these files, and the same `VIEWS_SQL` on top: every query of the project runs unchanged. A per-batch
file that cannot be read is left out with a warning naming it and the command that rebuilds it; a
damaged prompts or groups file fails the read with that message (its writer replaces it whole).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from clip_assets.config.layout import batch_stem
from clip_assets.storage import object_store
from clip_assets.storage.atomic_files import atomic_write, write_parquet_atomically
from clip_assets.storage.damaged_files import Artifact, materialize, open_parquet, readable_parquet_files
from clip_assets.storage.warehouse_schema import TABLES_SQL, VIEWS_SQL, scratch

log = logging.getLogger(__name__)

CLASSIFICATIONS_DIR = "classifications"
PROMPTS_FILE = "prompts.parquet"
DUPLICATE_GROUPS_FILE = "duplicate_groups.parquet"
# The column of prompts.parquet that says which table a row belongs to.
ROW_OF = "row_of"
_STORED = "stored"  # the in-memory schema holding the tables' empty, typed definitions

# The files, and what rebuilds each (clip_assets.storage.damaged_files).
CLASSIFICATIONS = Artifact("the classifications of batch {batch}; left out until rebuilt", "image_classifications",
                           partitioned=True)  # fmt: skip
PROMPTS = Artifact("the prompt centroids and categories", "prompt_centroids")
DUPLICATE_GROUPS = Artifact(
    "the near-duplicate groups", how=f"{materialize('near_duplicates')} (or delete the file: no groups until then)"
)


def classifications_path(root: Path, batch: str) -> Path:
    return Path(root) / CLASSIFICATIONS_DIR / f"{batch_stem(batch)}.parquet"


def exists(root: Path) -> bool:
    """Whether anything was written: the prompts file is the first (prompt_centroids writes it)."""
    _follow_store(Path(root) / PROMPTS_FILE)
    return (Path(root) / PROMPTS_FILE).is_file()


# ---------------------------------------------------------------- writers


def replace_batch(root: Path, batch: str, rows: pa.RecordBatchReader) -> int:
    """Write the batch's rows as its file, streamed (the batch never sits in memory whole); the old file
    stays until the new one is whole. Returns the rows written."""
    written = 0
    with atomic_write(classifications_path(root, batch)) as tmp, pq.ParquetWriter(tmp, rows.schema) as writer:
        for record_batch in rows:
            writer.write_batch(record_batch)
            written += record_batch.num_rows
    return written


def replace_prompts(root: Path, centroid_rows: pa.Table, category_rows: pa.Table) -> None:
    """Both prompt tables in one file, replaced at once."""
    tagged = [t.append_column(ROW_OF, pa.array([name] * t.num_rows, pa.string()))
              for name, t in (("prompt_centroids", centroid_rows), ("prompt_categories", category_rows))]  # fmt: skip
    write_parquet_atomically(pa.concat_tables(tagged, promote_options="default"), Path(root) / PROMPTS_FILE)


def replace_duplicate_groups(root: Path, rows: pa.Table) -> None:
    write_parquet_atomically(rows, Path(root) / DUPLICATE_GROUPS_FILE)


# ---------------------------------------------------------------- readers


def _follow_store(path: Path, folder: bool = False) -> None:
    """In a data directory kept in an object store, the local copy brought up to the store first."""
    store = object_store.store_for(path)
    if store is not None:
        store.sync_folder(path) if folder else store.refresh(path)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _files_sql(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def _view_over(con: duckdb.DuckDBPyConnection, table: str, paths: list[Path], where: str = "") -> None:
    """View `table` over the files: the stored table's columns, cast to its types; a column no file has
    takes the table's default (as an INSERT BY NAME into the DuckDB file gives it); no files: the empty table."""
    if not paths:
        con.execute(f"CREATE VIEW main.{table} AS SELECT * FROM {_STORED}.{table}")
        return
    files = f"read_parquet({_files_sql(paths)}, union_by_name = true)"
    in_files = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {files}").fetchall()}
    columns = con.execute(
        "SELECT column_name, data_type, column_default FROM duckdb_columns() "
        "WHERE schema_name = ? AND table_name = ? ORDER BY column_index",
        [_STORED, table],
    ).fetchall()
    select = ", ".join(
        f"CAST({_quoted(c) if c in in_files else (default or 'NULL')} AS {t}) AS {_quoted(c)}"
        for c, t, default in columns
    )
    con.execute(f"CREATE VIEW main.{table} AS SELECT {select} FROM {files} {where}")


def _whole_file(path: Path, artifact: Artifact) -> list[Path]:
    """[path] when there is a file, [] when there is none; a damaged one raises DamagedFileError."""
    _follow_store(path)
    if not path.is_file():
        return []
    open_parquet(path, artifact).close()
    return [path]


@contextlib.contextmanager
def reader(root: Path, memory_limit: str | None = None,
           classifications: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB with the warehouse's tables and views over the parquet files under `root`.

    The files are listed once, here: a batch written later shows in the next connection. Damaged
    per-batch files are left out, each logged as a warning naming it and its rebuild.
    `classifications` False: image_classifications is left empty and no batch's file is listed or
    fetched (a step that reads only the prompts, on a machine whose copy of the store is cold).
    """
    root = Path(root)
    batch_files = []
    if classifications:
        batches_dir = root / CLASSIFICATIONS_DIR
        _follow_store(batches_dir, folder=True)
        batch_files, _ = readable_parquet_files(sorted(batches_dir.glob("*.parquet")), CLASSIFICATIONS)
    prompts = _whole_file(root / PROMPTS_FILE, PROMPTS)
    groups = _whole_file(root / DUPLICATE_GROUPS_FILE, DUPLICATE_GROUPS)
    with scratch() as con:
        if memory_limit is not None:
            con.execute(f"SET memory_limit = '{memory_limit}'")
        con.execute(f"CREATE SCHEMA {_STORED}; SET schema = '{_STORED}'")
        con.execute(TABLES_SQL)
        con.execute("SET schema = 'main'")
        for table in ("prompt_centroids", "prompt_categories"):
            _view_over(con, table, prompts, f"WHERE {ROW_OF} = '{table}'")
        _view_over(con, "image_classifications", batch_files)
        _view_over(con, "duplicate_groups", groups)
        con.execute(VIEWS_SQL)
        yield con
