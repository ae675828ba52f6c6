"""The index codec: trained once for the collection, shared by every batch's shard, never retrained by a new batch.

Real faiss indexes over real parquet embeddings in a temp data directory; no mocks.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from clip_assets.config.layout import DataLayout
from clip_assets.search import ann_index, shard_set
from clip_assets_tests.support.vectors import planted, write_vectors

DIM = 64
MODEL = "test/planted"


def batches_of(layout: DataLayout, rows: dict[str, int], seed: int = 10) -> dict[str, tuple[np.ndarray, list[str]]]:
    out = {}
    for i, (batch, n) in enumerate(rows.items()):
        vectors = planted(n, DIM, seed + i)
        out[batch] = (vectors, write_vectors(layout, batch, vectors))
    return out


def test_the_first_shard_trains_the_codec_and_later_batches_fill_it_without_touching_other_shards(tmp_path):
    layout = DataLayout(tmp_path / "data")
    data = batches_of(layout, {"batch-1": ann_index.MIN_ROWS_FOR_IVF, "batch-2": 5_000})
    first = ann_index.build_batch_shard(layout, "batch-1")
    assert first.kind == ann_index.KIND_IVF and first.codec_trained and first.codec_rows == ann_index.MIN_ROWS_FOR_IVF
    codec = layout.ann_codec_path(MODEL)
    codec_bytes, shard_1_mtime = codec.read_bytes(), layout.ann_shard_path("batch-1").stat().st_mtime_ns
    assert json.loads(layout.ann_codec_note_path(MODEL).read_text())["factory"] == first.factory

    second = ann_index.build_batch_shard(layout, "batch-2")  # a small batch: the codec exists, so it is encoded too
    assert second.kind == ann_index.KIND_IVF and not second.codec_trained and second.codec == first.codec
    assert codec.read_bytes() == codec_bytes and layout.ann_shard_path("batch-1").stat().st_mtime_ns == shard_1_mtime
    assert ann_index.is_fresh(layout, "batch-1") and ann_index.is_fresh(layout, "batch-2")

    # every stored vector finds itself through the shared lists, whichever shard holds it
    files = [layout.embeddings_path(b) for b in data]
    for batch, (vectors, ids) in data.items():
        for row in (0, len(ids) // 2, len(ids) - 1):
            hits = ann_index.approximate_top_k(layout, files, vectors[row], k=1)
            assert hits[0][1:] == (ids[row], batch) and hits[0][0] == pytest.approx(1.0, abs=1e-5)

    # a category filter reaches into the IVF shards: the best allowed image, never a filtered-out one
    query = data["batch-1"][0][0]
    allowed = set(data["batch-2"][1][:100])
    hits = ann_index.approximate_top_k(layout, files, query, k=3, allowed_ids=allowed)
    expected = np.argsort(-(data["batch-2"][0][:100] @ query))[:3]
    assert [h[1] for h in hits] == [data["batch-2"][1][i] for i in expected]


def test_a_collection_too_small_for_a_codec_is_scored_exactly_and_a_removed_codec_makes_shards_stale(tmp_path):
    layout = DataLayout(tmp_path / "data")
    batches_of(layout, {"small-1": 3_000, "small-2": 4_000})
    for batch in ("small-1", "small-2"):
        assert ann_index.build_batch_shard(layout, batch).kind == ann_index.KIND_EXACT
    assert not layout.ann_codec_path(MODEL).exists()

    # the collection grows past the threshold: the new batch's codec sample takes in the other batches' rows
    big = batches_of(layout, {"big": ann_index.MIN_ROWS_FOR_IVF - 5_000}, seed=30)
    summary = ann_index.build_batch_shard(layout, "big")
    assert summary.kind == ann_index.KIND_IVF and summary.codec_trained
    assert summary.codec_rows == ann_index.MIN_ROWS_FOR_IVF + 2_000
    assert ann_index.is_fresh(layout, "small-1")  # an exact shard stays fresh under a new codec

    # deleting the codec (to retrain it) leaves the IVF shard stale, so search scores that batch exactly
    layout.ann_codec_path(MODEL).unlink()
    assert not ann_index.is_fresh(layout, "big")
    vectors, ids = big["big"]
    hits = ann_index.approximate_top_k(layout, [layout.embeddings_path(b) for b in ("small-1", "small-2", "big")],
                                       vectors[7], k=1)
    assert hits[0][1] == ids[7]
    again = ann_index.build_batch_shard(layout, "big")
    assert again.codec_trained and ann_index.is_fresh(layout, "big")
    assert again.codec == summary.codec  # the same sample and seed train the same codec: training is repeatable


def test_two_builders_racing_to_train_the_codec_both_use_the_first_one_written(tmp_path):
    target = tmp_path / "codec.faiss"
    sample = planted(ann_index.MIN_ROWS_FOR_IVF, DIM, 5)
    assert ann_index.train_codec(sample, len(sample), target)
    written = target.read_bytes()
    assert not ann_index.train_codec(planted(ann_index.MIN_ROWS_FOR_IVF, DIM, 6), len(sample), target)
    assert target.read_bytes() == written and sorted(p.name for p in tmp_path.iterdir()) == ["codec.faiss"]


def test_shards_of_different_codecs_are_never_searched_together(tmp_path):
    sample = planted(ann_index.MIN_ROWS_FOR_IVF, DIM, 5)
    shards = []
    for name in ("a", "b"):
        ann_index.train_codec(sample, len(sample), tmp_path / f"{name}.faiss")
        codec = shard_set.read_faiss(tmp_path / f"{name}.faiss")
        ann_index.fill_shard(codec, sample[:1000], tmp_path / f"{name}-shard.faiss")
        shards.append(shard_set.Shard(name, sample[:1000], shard_set.read_faiss(tmp_path / f"{name}-shard.faiss"), name))
    with pytest.raises(ValueError, match="different codecs"):
        shard_set.ShardSet(shards)


def test_codec_lists_grow_with_the_square_root_of_the_collection_and_stay_trainable():
    assert ann_index.codec_factory(20_000, 512) == "IVF128,PQ256x4fs"
    assert ann_index.codec_factory(1_000_000, 512) == "IVF512,PQ256x4fs"
    assert ann_index.codec_factory(10_000_000, 512) == "IVF2048,PQ256x4fs"
    assert ann_index.codec_factory(10**9, 512) == f"IVF{ann_index.MAX_LISTS},PQ256x4fs"
    assert 20_000 // ann_index.codec_lists(20_000) >= ann_index.TRAINING_POINTS_PER_LIST


def test_through_dagster_the_first_partition_trains_the_codec_and_the_next_fills_it(settings, instance, tmp_path):
    import dagster as dg

    from clip_assets.definitions import build_definitions
    from clip_assets.instance.execution import materialize, register_batches

    settings = settings.model_copy(update={"data_dir": tmp_path / "indexed"})
    layout = DataLayout(settings.data_dir)
    batches_of(layout, {"batch-1": ann_index.MIN_ROWS_FOR_IVF, "batch-2": 5_000})
    defs = build_definitions(settings)
    register_batches(instance, ["batch-1", "batch-2"])
    meta = {}
    for batch in ("batch-1", "batch-2"):
        result = materialize(defs, instance, [dg.AssetKey("image_search_index")], partition_key=batch)
        meta[batch] = {k: v.value for k, v in result.asset_materializations_for_node("image_search_index")[0].metadata.items()}
    assert meta["batch-1"]["codec_trained_in_this_run"] is True and meta["batch-2"]["codec_trained_in_this_run"] is False
    assert meta["batch-1"]["codec"] == meta["batch-2"]["codec"] != "-"
    assert meta["batch-1"]["codec_trained_for_rows"] == meta["batch-2"]["codec_trained_for_rows"] == ann_index.MIN_ROWS_FOR_IVF
    assert [meta[b]["kind"] for b in meta] == [ann_index.KIND_IVF, ann_index.KIND_IVF]
    assert [meta[b]["dagster/row_count"] for b in meta] == [ann_index.MIN_ROWS_FOR_IVF, 5_000]


def test_the_codec_counts_every_batch_of_the_collection_though_it_samples_at_most_64(tmp_path):
    layout = DataLayout(tmp_path / "data")
    small = {f"b-{i:03d}": 300 for i in range(ann_index.MAX_TRAINING_BATCHES)}  # 19,200 rows: no codec yet
    batches_of(layout, small)
    for batch in small:
        assert ann_index.build_batch_shard(layout, batch).kind == ann_index.KIND_EXACT
    batches_of(layout, {"last": 1_000}, seed=500)
    summary = ann_index.build_batch_shard(layout, "last")
    # the sample is drawn from 64 of the 65 batches, but the lists are chosen for all of them
    assert summary.codec_trained and summary.codec_rows == 300 * ann_index.MAX_TRAINING_BATCHES + 1_000
    assert json.loads(layout.ann_codec_note_path(MODEL).read_text())["collection_rows"] == summary.codec_rows
