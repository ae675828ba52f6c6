"""Other tools open the DuckDB file: it is written in DuckDB 1.4's storage format (the warehouse's
STORAGE_VERSION), and a real DuckDB 1.x (the `duckdb` CLI of the `duckdb-cli` package, a dev
dependency) runs the example queries of docs/data.md on the pipeline's file with the same results as
the project's DuckDB 2. A file DuckDB 2 wrote in its own format (as this project did before) is
rewritten in the chosen one by the next writer, rows and views kept."""

from __future__ import annotations

import importlib.util
import logging
import re
import subprocess
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_assets.classification.steps import write_classifications
from clip_assets.config.settings import REPO_ROOT
from clip_assets.storage import warehouse, warehouse_schema
from clip_assets.storage.atomic_files import TEMP_MARKER

DOCS_PAGE = REPO_ROOT / "docs" / "data.md"
# `con.sql("""...""")` / `duckdb.sql("...")` in the page's example: on the DuckDB file, or on parquet only.
_QUERY = re.compile(r'\b(con|duckdb)\.sql\(\s*(?:"""(.*?)"""|"([^"]*)")\s*\)', re.DOTALL)
TABLES = ["prompt_centroids", "prompt_categories", "image_classifications", "duplicate_groups"]
VIEWS = ["image_labels", "category_counts", "near_duplicate_groups"]


@pytest.fixture(scope="module")
def duckdb_1x() -> Path:
    """The DuckDB 1.x CLI binary the `duckdb-cli` wheel carries (its `duckdb` script only wraps it)."""
    spec = importlib.util.find_spec("duckdb_cli")
    assert spec is not None and spec.origin, "duckdb-cli (a dev dependency) is not installed: uv sync"
    binary = Path(spec.origin).parent / "duckdb"
    version = subprocess.run([str(binary), "-version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("v1."), version
    return binary


def documented_queries() -> list[tuple[bool, str]]:
    """(on the DuckDB file?, SQL) of each query in docs/data.md's example, in the page's order."""
    page = DOCS_PAGE.read_text()
    block = page[page.index('duckdb.connect("data/clip_assets.duckdb", read_only=True)') :]
    block = block[: block.index("```")]
    return [(m[1] == "con", (m[2] or m[3]).strip()) for m in _QUERY.finditer(block)]


def run_1x(binary: Path, cwd: Path, database: str | None, sql: str) -> subprocess.CompletedProcess:
    """`duckdb [-readonly DATABASE] -c SQL` as a person types it, with no ~/.duckdbrc read."""
    args = [str(binary), "-init", "/dev/null", "-batch"]
    if database:
        args += ["-readonly", database]
    return subprocess.run(args + ["-c", sql], check=False, cwd=cwd, capture_output=True, text=True, timeout=120)


def rows_by_1x(binary: Path, cwd: Path, database: str | None, sql: str, out: Path) -> list[dict]:
    done = run_1x(binary, cwd, database, f"COPY ({sql}) TO '{out}' (FORMAT parquet)")
    assert done.returncode == 0, done.stderr
    return pq.read_table(out).to_pylist()


def rows_by_2x(path: Path | None, sql: str) -> list[dict]:
    if path is None:
        with warehouse_schema.scratch() as con:
            return con.sql(sql).to_arrow_table().to_pylist()
    with warehouse.connect(path, read_only=True) as con:
        return con.sql(sql).to_arrow_table().to_pylist()


def contents(path: Path) -> dict[str, list[tuple]]:
    """Every table's and view's rows, in a fixed order."""
    with warehouse.connect(path, read_only=True) as con:
        return {name: sorted(con.execute(f"SELECT * FROM {name}").fetchall(), key=repr) for name in TABLES + VIEWS}


def storage_version(path: Path) -> str:
    with warehouse.connect(path, read_only=True) as con:
        return warehouse.file_storage_version(con)


def write_in_duckdb_2_format(path: Path) -> None:
    """Make `path` the file DuckDB 2 writes by default (storage format v2.0.0), same tables and rows."""
    old = path.with_name("old.duckdb")
    with warehouse_schema.scratch() as con:
        con.execute(f"ATTACH '{path}' AS current (READ_ONLY)")
        con.execute(f"ATTACH '{old}' AS old (STORAGE_VERSION 'v2.0.0')")
        con.execute("COPY FROM DATABASE current TO old")
        con.execute("DETACH old")
        con.execute("DETACH current")
    old.replace(path)
    assert storage_version(path) == "v2.0.0+"


def test_the_pipelines_file_is_in_the_chosen_format_and_duckdb_1x_runs_the_documented_queries(
    classified, duckdb_1x, monkeypatch
):
    work = classified.data_dir.parent  # the docs' queries name `data/...`, relative to the project folder
    assert classified.data_dir == work / "data" and classified.duckdb_path == work / "data" / "clip_assets.duckdb"
    monkeypatch.chdir(work)
    assert storage_version(classified.duckdb_path) == f"{warehouse.STORAGE_VERSION}+"
    queries = documented_queries()
    assert [on_file for on_file, _ in queries] == [True, True, False], queries
    for i, (on_file, sql) in enumerate(queries):
        expected = rows_by_2x(classified.duckdb_path if on_file else None, sql)
        got = rows_by_1x(duckdb_1x, work, "data/clip_assets.duckdb" if on_file else None, sql, work / f"q{i}.parquet")
        assert expected, sql  # each example shows rows here: images, categories, the unusable files
        if "ORDER BY" in sql or "category_counts" in sql:  # the view is ordered by the prompt files' order
            assert got == expected, sql
        else:
            assert sorted(got, key=repr) == sorted(expected, key=repr), sql


def test_a_file_in_duckdb_2s_own_format_is_rewritten_by_the_next_writer_and_loses_nothing(
    classified, duckdb_1x, caplog
):
    path = classified.duckdb_path
    write_in_duckdb_2_format(path)
    before = contents(path)
    refused = run_1x(duckdb_1x, path.parent, path.name, "SELECT count(*) FROM image_classifications")
    assert refused.returncode != 0 and "Trying to read a database file with version number" in refused.stderr

    with caplog.at_level(logging.WARNING, logger=warehouse.__name__):
        write_classifications(classified, "batch-002")  # a pipeline writer: rewrites the file, then writes

    assert storage_version(path) == f"{warehouse.STORAGE_VERSION}+"
    assert contents(path) == before  # the same batch's rows written again: every table and view as it was
    assert [r.message for r in caplog.records if f"rewritten in {warehouse.STORAGE_VERSION}'s" in r.message], (
        caplog.text
    )
    assert sorted(p.name for p in path.parent.iterdir() if "duckdb" in p.name) == ["clip_assets.duckdb"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(TEMP_MARKER)]
    read = run_1x(duckdb_1x, path.parent, path.name, "SELECT count(*) AS n FROM image_labels")
    assert read.returncode == 0 and str(len(before["image_labels"])) in read.stdout, read.stderr


def test_a_rewrite_that_cannot_run_leaves_the_file_as_it_was_and_the_write_goes_on(classified, caplog):
    """Another connection of this process holds the file (a notebook that imported the project; DuckDB
    shares one database per path in a process): replacing the file under it would split the two, so the
    writer writes into the old format and says so."""
    path = classified.duckdb_path
    write_in_duckdb_2_format(path)
    before = contents(path)
    group = pa.table(
        {
            "group_id": ["a"] * 2,
            "position": pa.array([0, 1], pa.int32()),
            "image_id": ["a", "b"],
            "path": ["x/a.jpg", "x/b.jpg"],
            "batch": ["x"] * 2,
            "similarity": pa.array([1.0, 0.97], pa.float32()),
            "threshold": [0.95] * 2,
        }
    )
    held = duckdb.connect(str(path), config={"storage_compatibility_version": warehouse.STORAGE_VERSION})
    try:
        with caplog.at_level(logging.WARNING, logger=warehouse.__name__):
            assert warehouse.replace_duplicate_groups(path, group) == 2
        assert held.execute("SELECT count(*) FROM duplicate_groups").fetchone()[0] == 2  # one database, both see it
    finally:
        held.close()
    assert storage_version(path) == "v2.0.0+"
    after = contents(path)
    width = group.num_columns  # the group's own columns; the table has more (tier, hash distance, ...), left empty
    assert [row[:width] for row in after["duplicate_groups"]] == sorted(
        (tuple(r.values()) for r in group.to_pylist()), key=repr)
    assert {k: v for k, v in after.items() if "duplicate" not in k} == {
        k: v for k, v in before.items() if "duplicate" not in k
    }
    assert not [p for p in path.parent.iterdir() if p.name.startswith(TEMP_MARKER)]
    (warning,) = [r.message for r in caplog.records if "stays in DuckDB's storage format v2.0.0+" in r.message]
    assert "COPY FROM DATABASE" in warning and str(path) in warning
