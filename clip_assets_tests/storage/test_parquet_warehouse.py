"""The parquet warehouse (CLIP_ASSETS_WAREHOUSE=parquet): the DuckDB file's tables and views over parquet files.

The same classification rows through both warehouses give the same answer to every table and view;
writer processes of different batches land at once; a batch written again replaces only itself; a
damaged batch file is named and left out.
"""

from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path

import pyarrow as pa
import pytest

from clip_assets.classification.steps import write_classifications
from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import Settings
from clip_assets.process import configure_process
from clip_assets.storage import object_store, parquet_warehouse, warehouse
from clip_assets.storage.warehouse import connect, read_centroids, read_duplicate_groups, replace_duplicate_groups
from clip_assets_tests.support.synthetic_centroids import store_synthetic_centroids
from clip_assets_tests.support.synthetic_embeddings import write_synthetic_batch

MODEL = "synthetic-model"
DIM = 32
BATCHES = ("batch-a", "batch-b")
# Every table and view a reader queries, each in an order that makes its rows comparable.
QUERIES = {
    "prompt_centroids": "SELECT * FROM prompt_centroids ORDER BY category, kind",
    "prompt_categories": "SELECT * FROM prompt_categories ORDER BY position",
    "image_classifications": "SELECT * FROM image_classifications ORDER BY batch, image_id, category",
    "image_labels": "SELECT * FROM image_labels ORDER BY batch, image_id",
    "category_counts": "SELECT * FROM category_counts",
    "duplicate_groups": "SELECT * FROM duplicate_groups ORDER BY group_id, position",
    "near_duplicate_groups": "SELECT * FROM near_duplicate_groups",
}


@pytest.fixture
def in_warehouse():
    """in_warehouse(kind): the process's warehouse, set at its edge as the CLI and the code location set it."""

    def use(kind: str) -> None:
        configure_process(Settings(warehouse=kind))

    yield use
    configure_process(Settings())


def _duplicate_groups() -> pa.Table:
    return pa.table({
        "group_id": ["g1", "g1", "g2", "g2", "g2"], "position": pa.array([0, 1, 0, 1, 2], pa.int32()),
        "image_id": ["a1", "b1", "a2", "a3", "b2"], "path": ["a/1.jpg", "b/1.jpg", "a/2.jpg", "a/3.jpg", "b/2.jpg"],
        "batch": ["batch-a", "batch-b", "batch-a", "batch-a", "batch-b"],
        "similarity": pa.array([1.0, 0.99, 1.0, 0.97, 0.96], pa.float32()), "threshold": [1.0, 1.0, 0.95, 0.95, 0.95],
        "tier": ["exact", "exact", "look-alike", "look-alike", "look-alike"],
        "same_bytes": [True, True, False, False, False],
    })  # fmt: skip


def _store(layout: DataLayout) -> None:
    """Centroids, both batches' classifications and the near-duplicate groups, into the process's warehouse."""
    store_synthetic_centroids(layout, categories=6, dim=DIM, model=MODEL)
    for batch in BATCHES:
        write_classifications(layout, batch)
    replace_duplicate_groups(layout.duckdb_path, _duplicate_groups())


def _answers(layout: DataLayout) -> dict[str, list[tuple]]:
    with connect(layout.duckdb_path, read_only=True) as con:
        return {name: con.execute(sql).fetchall() for name, sql in QUERIES.items()}


def _column_types(layout: DataLayout) -> dict[str, list[tuple]]:
    with connect(layout.duckdb_path, read_only=True) as con:
        return {name: [(c, str(t)) for c, t, *_ in con.execute(f"DESCRIBE {name}").fetchall()] for name in QUERIES}


@pytest.fixture
def layout(tmp_path) -> DataLayout:
    layout = DataLayout(tmp_path / "data")
    for seed, batch in enumerate(BATCHES):
        write_synthetic_batch(layout, batch, images=300 + 40 * seed, dim=DIM, model=MODEL, clusters=8, seed=seed)
    return layout


def test_the_same_rows_through_both_warehouses_answer_every_query_alike(layout, in_warehouse):
    in_warehouse("duckdb")
    _store(layout)
    in_duckdb, duckdb_types, duckdb_centroids = _answers(layout), _column_types(layout), read_centroids(layout.duckdb_path)
    in_warehouse("parquet")
    assert not warehouse.exists(layout.duckdb_path)  # the DuckDB file beside it is not the parquet warehouse
    _store(layout)
    assert warehouse.exists(layout.duckdb_path)
    assert sorted(p.name for p in (layout.warehouse_dir / "classifications").iterdir()) == [
        "batch-a.parquet",
        "batch-b.parquet",
    ]
    in_parquet = _answers(layout)
    assert in_parquet == in_duckdb
    assert len(in_parquet["image_labels"]) == 300 + 340
    assert sum(r[3] for r in in_parquet["category_counts"]) > 0  # some matches: the comparison is not of empties
    assert _column_types(layout) == duckdb_types
    assert read_centroids(layout.duckdb_path).prompt_version == duckdb_centroids.prompt_version
    assert read_duplicate_groups(layout.duckdb_path, 10) == _with_threshold_dropped(layout)


def _with_threshold_dropped(layout: DataLayout) -> list[dict]:
    """What the DuckDB file's groups read as, through the same function, with the process back on DuckDB."""
    configure_process(Settings(warehouse="duckdb"))
    try:
        return read_duplicate_groups(layout.duckdb_path, 10)
    finally:
        configure_process(Settings(warehouse="parquet"))


def _classify_in_parquet(data_dir: str, batch: str, start) -> None:
    configure_process(Settings(warehouse="parquet"))
    start.wait(60)
    write_classifications(DataLayout(Path(data_dir)), batch)


def test_writer_processes_of_different_batches_both_land(layout, in_warehouse):
    in_warehouse("parquet")
    store_synthetic_centroids(layout, categories=6, dim=DIM, model=MODEL)
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(len(BATCHES))
    writers = [context.Process(target=_classify_in_parquet, args=(str(layout.data_dir), b, start)) for b in BATCHES]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
    assert [w.exitcode for w in writers] == [0, 0]
    with connect(layout.duckdb_path, read_only=True) as con:
        per_batch = dict(con.execute("SELECT batch, count(DISTINCT image_id) FROM image_classifications GROUP BY ALL").fetchall())
    assert per_batch == {"batch-a": 300, "batch-b": 340}


def test_a_batch_written_again_replaces_only_itself(layout, in_warehouse):
    in_warehouse("parquet")
    _store(layout)
    other = parquet_warehouse.classifications_path(layout.warehouse_dir, "batch-b")
    other_bytes, other_stat = other.read_bytes(), other.stat()
    before = _answers(layout)["image_classifications"]
    write_synthetic_batch(layout, "batch-a", images=120, dim=DIM, model=MODEL, clusters=8, seed=7)  # fewer images now
    write_classifications(layout, "batch-a")
    after = _answers(layout)["image_classifications"]
    assert [r for r in after if r[0] == "batch-b"] == [r for r in before if r[0] == "batch-b"]
    assert len({r[1] for r in after if r[0] == "batch-a"}) == 120  # none of the old 300 rows left, none twice
    assert other.read_bytes() == other_bytes and other.stat().st_mtime_ns == other_stat.st_mtime_ns


def test_a_damaged_batch_file_is_named_and_left_out(layout, in_warehouse, caplog):
    in_warehouse("parquet")
    _store(layout)
    damaged = parquet_warehouse.classifications_path(layout.warehouse_dir, "batch-b")
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # cut short: no footer
    with caplog.at_level(logging.WARNING):
        answers = _answers(layout)
    assert {r[0] for r in answers["image_labels"]} == {"batch-a"}
    assert [r[2] for r in answers["category_counts"]] == [300] * 6
    warning = next(r.getMessage() for r in caplog.records if str(damaged) in r.getMessage())
    assert "image_classifications --partition batch-b" in warning
    write_classifications(layout, "batch-b")  # the rebuild the warning names
    assert {r[0] for r in _answers(layout)["image_labels"]} == set(BATCHES)


def test_in_a_bucket_a_batch_classified_on_one_machine_is_read_on_another(s3_store, in_warehouse, tmp_path):
    """Two local copies of one data directory in a bucket (two machines' caches): what one classifies,
    the other's views read, the DuckDB file on neither."""
    in_warehouse("parquet")
    url = s3_store.url("data")
    writer = DataLayout(object_store.open_store(url, cache_dir=tmp_path / "machine-1").local_root)
    reader = DataLayout(object_store.open_store(url, cache_dir=tmp_path / "machine-2").local_root)
    try:
        for seed, batch in enumerate(BATCHES):
            write_synthetic_batch(writer, batch, images=300 + 40 * seed, dim=DIM, model=MODEL, clusters=8, seed=seed)
        _store(writer)
        assert "data/warehouse/classifications/batch-a.parquet" in s3_store.keys("data/warehouse/")
        assert warehouse.exists(reader.duckdb_path)
        assert _answers(reader) == _answers(writer)
        assert not writer.duckdb_path.exists() and not reader.duckdb_path.exists()

        s3_store.filesystem().pipe(f"{s3_store.bucket}/data/text_query_encoders/saved-tower.pt", b"x" * 4096)
        third = DataLayout(object_store.open_store(url, cache_dir=tmp_path / "machine-3").local_root)
        assert read_centroids(third.duckdb_path).categories == read_centroids(writer.duckdb_path).categories
        # a step that needs only the prompts (classifying one batch) fetches no batch's classifications
        assert not list((third.warehouse_dir / "classifications").glob("*"))
        third.sweep_stale_temp_files("batch-a")  # every step's first move: local temp files only
        assert not (third.data_dir / "text_query_encoders" / "saved-tower.pt").exists()  # a search fetches it
    finally:
        object_store.forget_stores()
