"""Search over real embeddings of the generated collection, made by the real tiny model."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_assets.cli import main
from clip_assets.config.layout import DataLayout
from clip_assets.embedding.engine import embeddings_schema
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.steps import write_embeddings
from clip_assets.ingest.steps import write_manifest
from clip_assets.search.exact_search import (
    NothingToSearchError,
    SearchModelMismatchError,
    SearchQueryError,
    top_k_streaming,
)
from clip_assets.search.query import search
from clip_assets.storage.arrow_vectors import vectors_matrix
from clip_assets.storage.warehouse import connect

BATCHES = ["batch-001", "batch-002"]


def stored(layout):
    """Every stored (image_id, batch, embedding), and the manifest paths."""
    ids, batches, mats, paths = [], [], [], {}
    for batch in BATCHES:
        table = pq.read_table(layout.embeddings_path(batch))
        ids += table["image_id"].to_pylist()
        batches += [batch] * table.num_rows
        mats.append(vectors_matrix(table["embedding"]))
        manifest = pq.read_table(layout.manifest_path(batch))
        paths.update(zip(manifest["image_id"].to_pylist(), manifest["path"].to_pylist()))
    return ids, batches, np.concatenate(mats), paths


def test_text_search_is_exact_best_first_with_paths(settings, clip, classified):
    hits = search(settings, text="a red circle", k=5, clip=clip)
    ids, batches, matrix, paths = stored(classified)
    expected = matrix @ clip.encode_texts(["a red circle"]).numpy()[0]
    order = np.argsort(-expected)[:5]
    assert [h.image_id for h in hits] == [ids[i] for i in order]
    np.testing.assert_allclose([h.score for h in hits], expected[order], rtol=1e-5)
    assert all(h.path == paths[h.image_id] and h.path.startswith(h.batch + "/") for h in hits)
    assert [h.batch for h in hits] == [batches[i] for i in order]


def test_image_search_finds_the_query_image_first(settings, clip, classified):
    _, _, _, paths = stored(classified)
    some_path = sorted(paths.values())[3]
    hits = search(settings, image=settings.image_root / some_path, k=3, clip=clip)
    assert hits[0].path == some_path
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].score >= hits[1].score >= hits[2].score


def test_an_image_query_takes_a_path_as_search_prints_it(settings, clip, classified, tmp_path, monkeypatch):
    printed = search(settings, text="a red circle", k=1, clip=clip)[0].path  # relative to the image root
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the image root: the path resolves against CLIP_ASSETS_IMAGE_ROOT
    assert search(settings, image=printed, k=1, clip=clip)[0].path == printed
    monkeypatch.chdir(settings.image_root.parent)  # relative to the current directory
    relative_to_cwd = f"{settings.image_root.name}/{printed}"
    assert search(settings, image=relative_to_cwd, k=1, clip=clip)[0].path == printed
    assert search(settings, image=str(settings.image_root / printed), k=1, clip=clip)[0].path == printed
    with pytest.raises(SearchQueryError, match="No image file nowhere/x.png .*looked in") as missing:
        search(settings, image="nowhere/x.png", clip=clip)
    assert "\n" not in str(missing.value)
    with pytest.raises(SearchQueryError, match="is a folder"):
        search(settings, image="batch-001", clip=clip)


def test_ties_break_by_image_id_so_a_smaller_k_is_a_prefix_of_a_larger(tmp_path):
    # Three distinct vectors, each stored several times across two files: every score is exact
    # (dyadic entries), so copies tie exactly, and ties must come out by image_id at every k.
    dim = 8
    basis = np.eye(dim, dtype=np.float32)
    copies = {"b0": [0, 1, 2, 0, 1, 2, 0, 1, 2, 1], "b1": [2, 1, 0, 1, 2]}
    files, ids_of = [], {}
    for batch, which in copies.items():
        ids = [f"{batch}-{n:02d}-{'xyz'[w]}" for n, w in enumerate(which)][::-1]  # ids not in row order
        vectors = basis[which]
        path = tmp_path / "embeddings" / f"{batch}.parquet"
        path.parent.mkdir(exist_ok=True)
        write_random_embeddings(path, ids, vectors)
        files.append(path)
        ids_of.update({i: w for i, w in zip(ids, which)})
    query = np.array([0.5, 0.25, 0.125, 0, 0, 0, 0, 0], dtype=np.float32)
    expected = sorted(ids_of, key=lambda i: (-query[ids_of[i]], i))
    for use_search_rows in (True, False):
        for chunk in (2, 3, 64):
            full = top_k_streaming(query, files, len(expected), record_batch_rows=chunk, use_search_rows=use_search_rows, threads=2)
            assert [h[1] for h in full] == expected
            for k in range(1, len(expected)):
                got = top_k_streaming(query, files, k, record_batch_rows=chunk, use_search_rows=use_search_rows, threads=2)
                assert got == full[:k], (k, chunk, use_search_rows)


def test_batch_and_category_filters(settings, clip, classified):
    only_two = search(settings, text="a shape", k=50, batches=["batch-002"], clip=clip)
    assert len(only_two) == 10 and {h.batch for h in only_two} == {"batch-002"}

    with connect(classified.duckdb_path, read_only=True) as con:
        category, = con.execute(
            "SELECT category FROM image_classifications WHERE matched GROUP BY category "
            "ORDER BY count(*) BETWEEN 1 AND 19 DESC, count(*) DESC LIMIT 1"
        ).fetchone()
        matched = {r[0] for r in con.execute(
            "SELECT image_id FROM image_classifications WHERE matched AND category = ?", [category]
        ).fetchall()}
    hits = search(settings, text="a shape", k=50, category=category, clip=clip)
    assert {h.image_id for h in hits} == matched
    with pytest.raises(NothingToSearchError, match="known categories"):
        search(settings, text="a shape", category="no-such-category", clip=clip)


def test_refuses_embeddings_of_another_model(settings, classified, other_checkpoint):
    # The identity check runs before the model is loaded: nothing is encoded with the wrong model.
    other = settings.model_copy(update={"pretrained": str(other_checkpoint)})
    with pytest.raises(SearchModelMismatchError, match="tiny-seed0"):
        search(other, text="a red circle")


def write_random_embeddings(path, ids, vectors, model="m"):
    pq.write_table(
        pa.table({"image_id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
                  "model": [model] * len(ids), "precision": ["float32"] * len(ids), "size": [None] * len(ids), "mtime": [None] * len(ids),
                  "fingerprint": [None] * len(ids), "perceptual_hash": [None] * len(ids)}, schema=embeddings_schema(vectors.shape[1])),
        path,
    )


@pytest.mark.parametrize("use_search_rows", [True, False], ids=["search rows", "parquet"])
def test_streaming_top_k_equals_a_full_load(tmp_path, use_search_rows):
    rng = np.random.default_rng(0)
    dim, files, all_ids, mats = 16, [], [], []
    for b in range(3):
        n = 1000 + 137 * b
        vectors = rng.standard_normal((n, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = [f"b{b}-{i}" for i in range(n)]
        path = tmp_path / "embeddings" / f"b{b}.parquet"
        path.parent.mkdir(exist_ok=True)
        write_random_embeddings(path, ids, vectors)
        files.append(path)
        all_ids += ids
        mats.append(vectors)
    query = rng.standard_normal(dim).astype(np.float32)
    scores = np.concatenate(mats) @ query
    best = np.argsort(-scores)[:25]
    got = top_k_streaming(query, files, 25, record_batch_rows=97, use_search_rows=use_search_rows)
    assert (tmp_path / "search_index" / "b0.f32").is_file() == use_search_rows
    assert [g[1] for g in got] == [all_ids[i] for i in best]
    assert [g[2] for g in got] == [all_ids[i].split("-")[0] for i in best]
    allowed = set(all_ids[::7])
    got = top_k_streaming(query, files, 5, allowed_ids=allowed, record_batch_rows=200, use_search_rows=use_search_rows)
    expected = [all_ids[i] for i in np.argsort(-scores) if all_ids[i] in allowed][:5]
    assert [g[1] for g in got] == expected


def unit_vectors(rows: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_search_index_follows_a_rewritten_embeddings_file(tmp_path):
    path = tmp_path / "embeddings" / "batch.parquet"
    path.parent.mkdir()
    vectors = unit_vectors(50, 8, seed=1)
    write_random_embeddings(path, [f"old-{i}" for i in range(50)], vectors)
    query = vectors[7]
    assert top_k_streaming(query, [path], 1)[0][1] == "old-7"
    # The batch is re-embedded: other images, fewer of them. The stale index must not answer.
    write_random_embeddings(path, [f"new-{i}" for i in range(30)], vectors[20:])
    assert top_k_streaming(vectors[25], [path], 1)[0][1] == "new-5"
    assert (tmp_path / "search_index" / "batch.f32").stat().st_size == 30 * 8 * 4


@pytest.mark.parametrize("damage", [b"", b"\x00garbage{", b"[1, 2]", b'{"rows": "many"}'])
def test_a_damaged_search_rows_note_is_rebuilt_not_a_traceback(tmp_path, damage):
    path = tmp_path / "embeddings" / "batch.parquet"
    path.parent.mkdir()
    vectors = unit_vectors(40, 8, seed=2)
    write_random_embeddings(path, [f"img-{i}" for i in range(40)], vectors)
    assert top_k_streaming(vectors[3], [path], 1)[0][1] == "img-3"  # writes the rows and their note
    note = tmp_path / "search_index" / "batch.json"
    note.write_bytes(damage)
    assert top_k_streaming(vectors[9], [path], 1)[0][1] == "img-9"
    assert json.loads(note.read_text())["rows"] == 40  # rebuilt beside the rows


def test_cli_prints_json_lines_and_a_table(settings, classified, cli_env, monkeypatch, capsys):
    cli_env(settings)
    assert main(["search", "a blue square", "-k", "4", "--json", "--batch", "batch-001"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4 and all(set(x) == {"image_id", "path", "batch", "score"} for x in lines)
    assert [x["score"] for x in lines] == sorted((x["score"] for x in lines), reverse=True)
    assert {x["batch"] for x in lines} == {"batch-001"}

    assert main(["search", "a blue square", "-k", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["rank", "score", "batch"] and len(table) == 3

    monkeypatch.setenv("CLIP_ASSETS_DATA_DIR", str(settings.data_dir.parent / "empty"))
    assert main(["search", "a blue square"]) == 1
    assert "materialize image_embeddings" in capsys.readouterr().err


def test_the_table_keeps_one_line_per_hit_whatever_the_file_names(settings, tmp_path, clip, cli_env, capsys):
    from PIL import Image

    root = tmp_path / "odd-root"
    (root / "odd").mkdir(parents=True)
    names = ["line\nbreak.png", "tab\there.png", "plain.png"]
    for n, name in enumerate(names):
        Image.new("RGB", (32, 32), (80 * n, 40, 200 - 60 * n)).save(root / "odd" / name)
    layout = DataLayout(settings.data_dir)
    write_manifest(root, layout, "odd")
    write_embeddings(clip, root, layout, "odd", EncodeOptions(batch_size=4, num_workers=0))
    cli_env(settings.model_copy(update={"image_root": root}))
    assert main(["search", "--image", "odd/line\nbreak.png", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert any("odd/line\\nbreak.png" in line for line in lines)
    assert any("odd/tab\\there.png" in line for line in lines)
    assert main(["search", "--image", "odd/line\nbreak.png", "-k", "3", "--json"]) == 0
    assert {json.loads(line)["path"] for line in capsys.readouterr().out.splitlines()} == {f"odd/{n}" for n in names}
