"""Damaged files under search: each one named with the command that rebuilds it, the other batches still
searched, and the file healed by what rebuilds it. Every test runs with each kind of damage
(clip_assets_tests.support.damage): cut to half, emptied, overwritten with random bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clip_assets.cli import main
from clip_assets.config.layout import DataLayout
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.steps import write_embeddings
from clip_assets.model.clip_model import model_identity
from clip_assets.search import ann_index
from clip_assets.search import near_duplicates as duplicates
from clip_assets.search.exact_search import check_query_model
from clip_assets.search.query import search
from clip_assets.search.search_rows import ensure_search_rows, fresh_search_rows, mapped_rows
from clip_assets.search.text_query_encoder import encoder_path, load_text_query_encoder
from clip_assets.storage.damaged_files import DamagedFileError, damaged_copies
from clip_assets_tests.support.damage import DAMAGES, damage
from clip_assets_tests.support.vectors import planted, write_vectors

MATERIALIZE = "dagster asset materialize -m clip_assets.definitions --select"


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_embeddings_file_is_left_out_of_search_named_and_rebuilt_by_its_step(
    how, settings, clip, classified, cli_env, capsys
):
    path = classified.embeddings_path("batch-002")
    damage(path, how)
    damaged_bytes = path.read_bytes()

    damaged: list[DamagedFileError] = []
    hits = search(settings, text="a red circle", k=30, clip=clip, damaged=damaged)
    assert hits and {h.batch for h in hits} == {"batch-001"}  # the other batch is served whole
    assert len(hits) == 10 and all(h.path.startswith("batch-001/") for h in hits)
    (exc,) = damaged
    assert exc.path == path and str(path) in str(exc)
    assert f"{MATERIALIZE} image_embeddings --partition batch-002" in str(exc)

    # the command line: the hits on stdout, one line on stderr naming the file and the command
    cli_env(settings)
    assert main(["search", "a red circle", "-k", "3", "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3 and "Traceback" not in err
    assert str(path) in err and "--select image_embeddings --partition batch-002" in err
    # the one damaged batch asked for by name: the message, exit 1, no traceback
    assert main(["search", "a red circle", "--batch", "batch-002"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "--partition batch-002" in err

    # re-materializing the batch's embeddings moves the damaged copy aside and encodes it afresh
    summary = write_embeddings(
        clip, settings.image_root, classified, "batch-002", EncodeOptions(batch_size=8, num_workers=0)
    )
    assert summary.encoded == summary.rows == 10 and summary.carried_over == 0
    (aside,) = damaged_copies(path)
    assert aside.name.startswith("batch-002.parquet.damaged-") and aside.read_bytes() == damaged_bytes
    damaged = []
    hits = search(settings, text="a red circle", k=30, clip=clip, damaged=damaged)
    assert not damaged and {h.batch for h in hits} == {"batch-001", "batch-002"} and len(hits) == 20


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_search_rows_are_rebuilt_from_the_parquet_file(how, settings, clip, classified):
    path = classified.embeddings_path("batch-001")
    expected = search(settings, text="a green triangle", k=20, clip=clip)
    rows = ensure_search_rows(path).path
    damage(rows, how)  # garbage of the same length too: the note holds the rows file's own mtime
    assert fresh_search_rows(path) is None
    assert search(settings, text="a green triangle", k=20, clip=clip) == expected
    assert fresh_search_rows(path) is not None and rows.stat().st_size == 10 * clip.embed_dim * 4


DIM = 32


def ivf_collection(tmp_path) -> tuple[DataLayout, dict[str, tuple[np.ndarray, list[str]]]]:
    """Two batches of planted vectors, large enough together for an IVF codec; both shards built."""
    layout = DataLayout(tmp_path / "data")
    data = {}
    for seed, (batch, rows) in enumerate({"big": ann_index.MIN_ROWS_FOR_IVF, "small": 2_000}.items()):
        vectors = planted(rows, DIM, 40 + seed)
        data[batch] = (vectors, write_vectors(layout, batch, vectors))
        assert ann_index.build_batch_shard(layout, batch).kind == ann_index.KIND_IVF
    return layout, data


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_index_shard_is_searched_exactly_named_and_rebuilt(how, tmp_path):
    layout, data = ivf_collection(tmp_path)
    files = [layout.embeddings_path(b) for b in data]
    shard = layout.ann_shard_path("small")
    damage(shard, how)
    assert ann_index.is_fresh(layout, "small")  # its note still matches: only reading it shows the damage

    vectors, ids = data["small"]
    damaged: list[DamagedFileError] = []
    hits = ann_index.approximate_top_k(layout, files, vectors[5], k=1, damaged=damaged)
    assert hits[0][1:] == (ids[5], "small")  # found all the same: the batch was scored exactly
    (exc,) = damaged
    assert exc.path == shard and f"{MATERIALIZE} image_search_index --partition small" in str(exc)
    big_vectors, big_ids = data["big"]
    assert ann_index.approximate_top_k(layout, files, big_vectors[9], k=1)[0][1:] == (big_ids[9], "big")

    # near-duplicates: the batch waits for its shard, as one without a shard does; the others go on
    summary = duplicates.update_pairs(layout, list(data), 0.99)
    assert summary.waiting_for_index == ["small"] and summary.indexed_batches == ["big"]
    assert any(str(shard) in w for w in summary.damaged)

    ann_index.build_batch_shard(layout, "small")  # what `image_search_index --partition small` runs
    damaged = []
    assert ann_index.approximate_top_k(layout, files, vectors[5], k=1, damaged=damaged)[0][1:] == (ids[5], "small")
    assert not damaged
    assert duplicates.update_pairs(layout, list(data), 0.99).indexed_batches == ["big", "small"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_codec_is_moved_aside_and_trained_again_by_the_next_shard(how, tmp_path, caplog):
    layout, data = ivf_collection(tmp_path)
    codec = layout.ann_codec_path("test/planted")
    damage(codec, how)
    # search is unharmed: the shards no longer match the codec, so each batch is scored exactly
    vectors, ids = data["small"]
    files = [layout.embeddings_path(b) for b in data]
    assert ann_index.approximate_top_k(layout, files, vectors[3], k=1)[0][1:] == (ids[3], "small")

    summary = ann_index.build_batch_shard(layout, "small")
    assert summary.kind == ann_index.KIND_IVF and summary.codec_trained
    (aside,) = damaged_copies(codec)
    assert aside.name.startswith(codec.name + ".damaged-")
    assert any(str(codec) in r.getMessage() and "moved aside" in r.getMessage() for r in caplog.records)
    assert ann_index.is_fresh(layout, "small") and not ann_index.is_fresh(layout, "big")  # big: rebuilt next
    ann_index.build_batch_shard(layout, "big")
    assert ann_index.is_fresh(layout, "big")


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_near_duplicate_pair_file_is_moved_aside_and_computed_again(how, tmp_path):
    layout = DataLayout(tmp_path / "data")
    base = planted(300, DIM, 3)
    for batch, vectors in {"one": base[:150], "two": np.concatenate([base[:20], base[150:]])}.items():
        write_vectors(layout, batch, vectors)
        ann_index.build_batch_shard(layout, batch)
    first = duplicates.update_pairs(layout, ["one", "two"], 0.99)
    pairs = duplicates.current_pairs(layout, first.indexed_batches).num_rows
    assert pairs >= 20
    path = layout.duplicate_pairs_path("one")
    damage(path, how)

    summary = duplicates.update_pairs(layout, ["one", "two"], 0.99)
    assert summary.recomputed == ["one"] and summary.reused == ["two"]
    assert any(str(path) in w and "moved aside" in w for w in summary.damaged)
    assert damaged_copies(path) and duplicates.current_pairs(layout, summary.indexed_batches).num_rows == pairs


def test_a_damaged_shard_note_counts_as_stale(tmp_path):
    layout = DataLayout(tmp_path / "data")
    vectors = planted(500, DIM, 1)
    ids = write_vectors(layout, "b", vectors)
    ann_index.build_batch_shard(layout, "b")
    for text in ("", "[1, 2]", '{"kind": 3}', "\x00garbage{"):
        layout.ann_shard_note_path("b").write_text(text)
        assert not ann_index.is_fresh(layout, "b") and ann_index.shard_version(layout, "b") is None
        hits = ann_index.approximate_top_k(layout, [layout.embeddings_path("b")], vectors[4], k=1)
        assert hits[0][1] == ids[4]
    assert np.allclose(mapped_rows(ensure_search_rows(layout.embeddings_path("b")))[4], vectors[4])
    ann_index.build_batch_shard(layout, "b")
    assert json.loads(layout.ann_shard_note_path("b").read_text())["kind"] == ann_index.KIND_EXACT
    assert ann_index.is_fresh(layout, "b")


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_manifest_leaves_its_hits_unnamed_and_says_so(how, settings, clip, classified):
    manifest = classified.manifest_path("batch-002")
    damage(manifest, how)
    damaged: list[DamagedFileError] = []
    hits = search(settings, text="a blue square", k=20, clip=clip, damaged=damaged)
    assert len(hits) == 20  # every image is still found; batch-002's cannot be named by path
    assert all(h.path.startswith("batch-001/") for h in hits if h.batch == "batch-001")
    assert all(h.path == "" for h in hits if h.batch == "batch-002")
    (exc,) = damaged
    assert exc.path == manifest and f"{MATERIALIZE} image_manifest --partition batch-002" in str(exc)


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_saved_text_encoder_is_moved_aside_and_saved_again(how, settings, classified, caplog):
    expected = search(settings, text="a red circle", k=5)  # loads the model and saves its text tower
    identity = model_identity(settings.model, settings.pretrained)
    path = encoder_path(classified.text_query_encoder_dir, identity)
    damage(path, how)
    damaged_bytes = path.read_bytes()

    assert search(settings, text="a red circle", k=5) == expected
    assert any(str(path) in r.getMessage() and "moved aside" in r.getMessage() for r in caplog.records)
    (aside,) = damaged_copies(path)
    assert aside.read_bytes() == damaged_bytes
    assert load_text_query_encoder(classified.text_query_encoder_dir, identity) is not None  # saved again


def test_the_model_check_leaves_a_damaged_file_out_as_the_app_starts(settings, clip, classified):
    """check_query_model (which `clip-assets serve` runs before it loads the model) reads each footer
    once: a damaged file is left out and named, the others are counted."""
    damage(classified.embeddings_path("batch-002"), "garbage")
    searchable = check_query_model(classified.embedding_files(), clip.identity)
    assert searchable.files == [classified.embeddings_path("batch-001")] and searchable.rows == 10
    assert [exc.path for exc in searchable.damaged] == [classified.embeddings_path("batch-002")]
