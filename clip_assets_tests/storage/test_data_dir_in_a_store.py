"""The data directory in an object store: the pipeline on a real S3-compatible server (moto on loopback).

Each "machine" is a cache folder of its own (the local working copy of the bucket's prefix); a second
machine shares nothing with the first but the bucket. Real tiny model, real parquet, real faiss; the
store is moto's HTTP server reached through botocore as AWS would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import Settings
from clip_assets.demo.shapes import write_collection
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.steps import write_embeddings
from clip_assets.embedding.store import PartFiles
from clip_assets.ingest.steps import write_manifest
from clip_assets.search import ann_index
from clip_assets.search.query import search
from clip_assets.search.search_rows import ensure_search_rows
from clip_assets.storage import object_store
from clip_assets.storage.damaged_files import DAMAGED_MARKER
from clip_assets_tests.conftest import BATCHES
from clip_assets_tests.support.vectors import planted, write_vectors

OPTIONS = EncodeOptions(batch_size=8, num_workers=0)


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """Switch this process to another machine's cache folder: `machine("a")`; stores opened before stay
    as they were (a layout made earlier keeps its working copy)."""
    monkeypatch.setattr(object_store, "_stores", {})

    def on(name: str) -> Path:
        cache = tmp_path / f"machine-{name}"
        object_store.configure_cache(cache, recheck_s=object_store.DEFAULT_RECHECK_S)
        return cache

    yield on
    object_store.configure_cache(None)


def run_pipeline(settings: Settings, clip) -> list[tuple[str, float]]:
    layout = DataLayout(settings.data_dir)
    for batch in BATCHES:
        write_manifest(settings.image_root, layout, batch)
        write_embeddings(clip, settings.image_root, layout, batch, OPTIONS)
        ann_index.build_batch_shard(layout, batch)
    return hits(settings, clip)


def hits(settings: Settings, clip, **kwargs) -> list[tuple[str, float]]:
    found = search(settings, text="a red circle", k=5, clip=clip, **kwargs)
    return [(h.image_id, round(h.score, 5)) for h in found]


def test_the_pipeline_on_a_bucket_gives_what_it_gives_on_a_local_disk_and_a_second_machine_reads_it(
    settings, clip, s3_store, machine
):
    local = run_pipeline(settings, clip)
    machine("a")
    in_store = settings.model_copy(update={"data_dir": s3_store.url("collection")})
    before = object_store.request_counts()
    assert run_pipeline(in_store, clip) == local
    written = object_store.requests_since(before)

    keys = s3_store.keys("collection/")
    for batch in BATCHES:
        for key in (
            f"manifest/{batch}.parquet",
            f"embeddings/{batch}.parquet",
            f"embedding_failures/{batch}.parquet",
            f"search_index/{batch}.f32",
            f"search_index/{batch}.json",
            f"ann_index/{batch}.json",
        ):
            assert f"collection/{key}" in keys
    assert not [k for k in keys if ".clip-assets-tmp" in k or ".parts/" in k or k.endswith(".duckdb")], keys
    local_files = sorted(
        p.relative_to(settings.data_dir).as_posix()
        for p in Path(settings.data_dir).rglob("*")
        if p.is_file() and "duckdb" not in p.name and "text_query_encoders" not in p.parts
    )
    assert sorted(k.removeprefix("collection/") for k in keys if "text_query_encoders" not in k) == local_files
    assert written.get("PUT", 0) >= len(keys) and not written.get("COPY")

    # another machine: nothing but the bucket; it searches what the first wrote, rebuilding nothing
    second = machine("b")
    before = object_store.request_counts()
    assert hits(in_store, clip) == local
    read = object_store.requests_since(before)
    assert not read.get("PUT") and read.get("GET", 0) >= 2, read
    assert (second / object_store._cache_folder_name(in_store.data_dir) / "embeddings" / "batch-001.parquet").is_file()
    layout = DataLayout(in_store.data_dir)
    assert all(ann_index.is_fresh(layout, b) for b in BATCHES)

    # a warm search looks at nothing it looked at a moment ago
    before = object_store.request_counts()
    assert hits(in_store, clip) == local
    assert object_store.requests_since(before) == {}
    print(f"requests, first machine's pipeline (2 batches): {written}; second machine's first search: {read}")


def test_a_changed_object_is_fetched_again_and_an_unchanged_one_costs_one_head(s3_store, machine, tmp_path):
    machine("a")
    writer = DataLayout(s3_store.url("d"))
    vectors = planted(50, 16, 1)
    write_vectors(writer, "b1", vectors)
    machine("b")
    reader = DataLayout(s3_store.url("d"))
    reader.store.recheck_s = 0  # look every time
    first = reader.embeddings_path("b1")
    assert pq.read_table(first).num_rows == 50
    before = object_store.request_counts()
    reader.embeddings_path("b1")
    assert object_store.requests_since(before) == {"HEAD": 1}

    write_vectors(writer, "b1", planted(70, 16, 2))  # the first machine writes it again
    before = object_store.request_counts()
    assert pq.read_table(reader.embeddings_path("b1")).num_rows == 70
    assert object_store.requests_since(before) == {"HEAD": 1, "GET": 1}
    assert reader.embeddings_path("b1").stat().st_mtime_ns == writer.embeddings_path("b1").stat().st_mtime_ns

    writer.store.remove(writer.embeddings_path("b1"))  # gone from the store: gone from the copy
    assert not reader.embeddings_path("b1").exists() and reader.embedding_files() == []


class WorkerKilled(BaseException):
    """What stops the first machine's worker, as SIGKILL would: after a part file is in the store."""


def test_a_worker_stopped_on_one_machine_is_resumed_on_another_from_the_parts_in_the_store(
    tmp_path, clip, s3_store, machine, monkeypatch
):
    root = tmp_path / "images"
    write_collection(root, batches=1, per_batch=64, seed=11)
    url = s3_store.url("data")
    options = EncodeOptions(batch_size=4, num_workers=0, chunk_rows=8)
    machine("a")
    write_manifest(root, DataLayout(url), "batch-001")
    write_part = PartFiles.write

    def dies_after_three_parts(self, table):
        write_part(self, table)
        if len(s3_store.keys("data/embeddings/batch-001.parts/")) >= 3:
            raise WorkerKilled  # a BaseException: no handler of the project's catches it, as none sees a SIGKILL

    monkeypatch.setattr(PartFiles, "write", dies_after_three_parts)
    with pytest.raises(WorkerKilled):
        write_embeddings(clip, root, DataLayout(url), "batch-001", options)
    monkeypatch.setattr(PartFiles, "write", write_part)
    parts = s3_store.keys("data/embeddings/batch-001.parts/")
    assert len(parts) == 3 and "data/embeddings/batch-001.parquet" not in s3_store.keys("data/")

    machine("b")  # a fresh machine: its cache folder has never seen this bucket
    layout = DataLayout(url)
    done_before = sum(pq.read_metadata(p).num_rows for p in layout.embedding_parts_dir("batch-001").glob("*.parquet"))
    assert done_before == 24
    summary = write_embeddings(clip, root, layout, "batch-001", options)
    assert summary.resumed == done_before and summary.encoded == 64 - done_before
    ids = pq.read_table(layout.embeddings_path("batch-001"))["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 64
    assert s3_store.keys("data/embeddings/batch-001.parts/") == []  # the parts are gone from the store too


def test_a_damaged_object_is_named_by_search_and_set_aside_and_rebuilt_by_its_step(settings, clip, s3_store, machine):
    machine("a")
    in_store = settings.model_copy(update={"data_dir": s3_store.url("data")})
    expected = run_pipeline(in_store, clip)
    fs = s3_store.filesystem()
    key = f"{s3_store.bucket}/data/embeddings/batch-002.parquet"
    fs.pipe(key, fs.cat(key)[:-100])  # cut short in the store, as a copy gone wrong would leave it

    machine("b")
    damaged = []
    found = hits(in_store, clip, damaged=damaged)
    assert damaged and "batch-002.parquet" in str(damaged[0]) and "image_embeddings" in str(damaged[0])
    machine("a")
    assert found == hits(in_store, clip, batches=["batch-001"])  # the other batch's hits, as before the damage
    machine("b")

    layout = DataLayout(in_store.data_dir)
    summary = write_embeddings(clip, in_store.image_root, layout, "batch-002", OPTIONS)
    assert summary.rows > 0
    aside = [k for k in s3_store.keys("data/embeddings/") if DAMAGED_MARKER in k]
    assert len(aside) == 1 and aside[0].startswith("data/embeddings/batch-002.parquet.damaged-")
    ann_index.build_batch_shard(layout, "batch-002")
    assert hits(in_store, clip) == expected


def test_the_index_codec_and_shards_on_a_bucket_are_fresh_on_another_machine(s3_store, machine):
    machine("a")
    url = s3_store.url("ann")
    layout = DataLayout(url)
    vectors = planted(ann_index.MIN_ROWS_FOR_IVF, 32, 5)
    ids = write_vectors(layout, "big", vectors)
    built = ann_index.build_batch_shard(layout, "big")
    assert built.kind == ann_index.KIND_IVF and built.codec_trained
    keys = s3_store.keys("ann/ann_index/")
    codec = layout.ann_codec_path("test/planted").name
    assert [k for k in keys if k.endswith(".faiss")] == sorted(["ann/ann_index/big.faiss", f"ann/ann_index/{codec}"])
    assert not [k for k in keys if k.endswith(".new")]

    machine("b")
    other = DataLayout(url)
    assert ann_index.is_fresh(other, "big")
    hit = ann_index.approximate_top_k(other, other.embedding_files(), vectors[7], k=1)
    assert hit[0][1:] == (ids[7], "big") and hit[0][0] == pytest.approx(1.0, abs=1e-5)
    assert json.loads(other.ann_shard_note_path("big").read_text())["kind"] == ann_index.KIND_IVF


def test_a_missing_bucket_or_no_credentials_is_one_line_naming_the_url_and_what_to_set(s3_store, machine, monkeypatch):
    machine("a")
    with pytest.raises(object_store.StoreError) as missing:
        DataLayout("s3://no-such-bucket-here/data")
    text = str(missing.value)
    assert "\n" not in text and "s3://no-such-bucket-here/data" in text and "does not exist" in text

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(object_store.StoreError) as refused:
        DataLayout(s3_store.url("data"))
    text = str(refused.value)
    assert "\n" not in text and s3_store.url("data") in text and "AWS_ACCESS_KEY_ID" in text


def test_a_scheme_without_its_package_names_the_package(machine):
    with pytest.raises((object_store.StoreError, ValueError)) as missing:
        DataLayout("gs://bucket/data")
    assert "gcsfs" in str(missing.value)


def test_a_plain_path_and_a_file_url_are_local_as_before(tmp_path):
    assert DataLayout(f"file://{tmp_path}/d").data_dir == tmp_path / "d"
    assert DataLayout(str(tmp_path / "d")).data_dir == tmp_path / "d" and DataLayout(tmp_path).store is None
    assert Settings(data_dir=f"file://{tmp_path}/d").data_dir == tmp_path / "d"
    assert Settings(data_dir="s3://bucket/prefix/").data_dir == "s3://bucket/prefix"


def test_search_rows_made_on_one_machine_are_used_on_another(s3_store, machine):
    machine("a")
    layout = DataLayout(s3_store.url("rows"))
    write_vectors(layout, "b", planted(100, 8, 3))
    made = ensure_search_rows(layout.embeddings_path("b"))
    machine("b")
    other = DataLayout(s3_store.url("rows"))
    before = object_store.request_counts()
    again = ensure_search_rows(other.embeddings_path("b"))
    assert (again.rows, again.dim) == (made.rows, made.dim) == (100, 8)
    assert not object_store.requests_since(before).get("PUT")  # found fresh, not rebuilt
    np.testing.assert_array_equal(np.fromfile(again.path, np.float32), np.fromfile(made.path, np.float32))
