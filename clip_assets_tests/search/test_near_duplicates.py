"""Near-duplicate groups and the index shards behind them.

The grouping test uses real generated images and real transformed copies of them (re-encoded as
JPEG, resized, cropped, recoloured). Their embeddings are not the tiny test model's: randomly
initialised, it maps every image to nearly the same vector (cosine ~1.0 between different images),
and the demo's shape-trained model maps different images with the same shapes and colours close
together (up to 0.999), so neither can separate a copy from another image. The test embeds with a
classic near-duplicate descriptor instead, an 8x8 colour thumbnail with its mean removed, written as
the pipeline's embeddings files: copies score >= 0.98 against their original, different images
<= 0.94, and the threshold 0.95 separates them. What is tested is everything after the embedding:
shards, pair finding, re-scoring, union-find, DuckDB, incremental updates and the page.
"""

from __future__ import annotations

import io
import random
import re

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageEnhance

from clip_assets.config.layout import DataLayout
from clip_assets.definitions import build_definitions
from clip_assets.defs.search.assets import KEEP_DUPLICATES_PAGES
from clip_assets.demo.shapes import make_sample
from clip_assets.embedding.decode import load_rgb
from clip_assets.embedding.engine import embeddings_schema
from clip_assets.embedding.perceptual_hash import perceptual_hash
from clip_assets.ingest.manifest import STATUS_OK
from clip_assets.ingest.steps import write_manifest
from clip_assets.instance.execution import materialize, register_batches
from clip_assets.pages.gallery import write_duplicates_page
from clip_assets.search import ann_index
from clip_assets.search.near_duplicates import update_duplicate_groups
from clip_assets.storage.atomic_files import write_parquet_atomically
from clip_assets.storage.warehouse import connect
from clip_assets_tests.support.chromium import CHROMIUM, chromium_dump_dom
from clip_assets_tests.support.vectors import planted, write_vectors

DESCRIPTOR = "test/rgb-8x8-thumbnail"


def descriptor(image: Image.Image) -> np.ndarray:
    v = np.asarray(image.convert("RGB").resize((8, 8), Image.BOX), np.float32).reshape(-1)
    v -= v.mean()
    return v / np.linalg.norm(v)


def write_descriptor_embeddings(image_root, layout: DataLayout, batch: str) -> None:
    """The batch's manifest (the real step) and an embeddings file of descriptors in the pipeline's schema."""
    write_manifest(image_root, layout, batch)
    manifest = pq.read_table(layout.manifest_path(batch)).to_pylist()
    ok = [m for m in manifest if m["status"] == STATUS_OK]
    vectors = np.stack([descriptor(load_rgb(image_root / m["path"])) for m in ok])
    write_parquet_atomically(pa.table({
        "image_id": [m["image_id"] for m in ok],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
        "model": [DESCRIPTOR] * len(ok),
        "precision": ["float32"] * len(ok),
        "size": [m["size"] for m in ok],
        "mtime": [m["mtime"] for m in ok],
        "fingerprint": [m["image_id"] for m in ok],
        "perceptual_hash": [perceptual_hash(load_rgb(image_root / m["path"])) for m in ok],
    }, schema=embeddings_schema(vectors.shape[1])), layout.embeddings_path(batch))


def reencoded(img):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=60)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def resized(img):
    return img.resize((img.width * 2 // 3, img.height * 2 // 3))


def cropped(img):
    dx, dy = img.width * 3 // 100, img.height * 3 // 100
    return img.crop((dx, dy, img.width - dx, img.height - dy))


def recoloured(img):
    return ImageEnhance.Color(ImageEnhance.Brightness(img).enhance(1.1)).enhance(0.85)


@pytest.fixture
def copies(tmp_path):
    """batch-a: 8 originals and a resized copy of one; batch-b: copies of three originals made three
    other ways, and 5 different images. Returns (image root, {original path: its copies' paths})."""
    root = tmp_path / "images"
    (root / "batch-a").mkdir(parents=True)
    (root / "batch-b").mkdir()
    rng = random.Random(5)
    originals = [make_sample(rng, (160, 120)).image for _ in range(13)]
    for i, img in enumerate(originals[:8]):
        img.save(root / "batch-a" / f"orig-{i}.png")
    for i, img in enumerate(originals[8:]):
        img.save(root / "batch-b" / f"other-{i}.png")
    expected = {f"batch-a/orig-{i}.png": [] for i in range(4)}
    for i, (name, make) in enumerate([("reencoded", reencoded), ("cropped", cropped), ("recoloured", recoloured)]):
        make(originals[i]).save(root / "batch-b" / f"{name}-{i}.jpg" if name == "reencoded" else
                                root / "batch-b" / f"{name}-{i}.png")
        expected[f"batch-a/orig-{i}.png"].append(f"batch-b/{name}-{i}.{'jpg' if name == 'reencoded' else 'png'}")
    resized(originals[3]).save(root / "batch-a" / "resized-3.png")
    expected["batch-a/orig-3.png"].append("batch-a/resized-3.png")
    return root, expected


def groups_in_duckdb(layout) -> dict[str, list[tuple[str, str, float]]]:
    with connect(layout.duckdb_path, read_only=True) as con:
        rows = con.execute(
            "SELECT group_id, path, batch, similarity FROM duplicate_groups ORDER BY group_id, position").fetchall()
    out: dict[str, list] = {}
    for group_id, path, batch, similarity in rows:
        out.setdefault(group_id, []).append((path, batch, similarity))
    return out


def indexed_batches(root, tmp_path) -> DataLayout:
    """Both batches' descriptor embeddings written and their search-index shards built."""
    layout = DataLayout(tmp_path / "data")
    for batch in ("batch-a", "batch-b"):
        write_descriptor_embeddings(root, layout, batch)
        ann_index.build_batch_shard(layout, batch)
    return layout


def test_copies_are_grouped_with_their_original_and_different_images_are_not(copies, tmp_path):
    root, expected = copies
    layout = indexed_batches(root, tmp_path)
    summary = update_duplicate_groups(layout, ["batch-a", "batch-b"], threshold=0.95)

    groups = groups_in_duckdb(layout)
    found = {members[0][0]: sorted(p for p, _, _ in members[1:]) for members in groups.values()}
    assert found == {original: sorted(c) for original, c in expected.items()}
    for members in groups.values():
        assert members[0][2] == pytest.approx(1.0, abs=1e-5)  # the first image against itself
        assert all(0.95 <= s <= 1.0001 for _, _, s in members[1:])
        assert all(batch == path.split("/")[0] for path, batch, _ in members)
    assert summary.recomputed == ["batch-a", "batch-b"] and summary.groups == 4 and summary.images_in_groups == 8

    with connect(layout.duckdb_path, read_only=True) as con:
        view = con.execute("SELECT images, batches, paths[1], min_similarity FROM near_duplicate_groups").fetchall()
    assert sorted(v[2] for v in view) == sorted(expected)
    assert {tuple(v[1]) for v in view} == {("batch-a", "batch-b"), ("batch-a",)}


def test_only_changed_batches_are_queried_again(copies, tmp_path):
    root, expected = copies
    layout = indexed_batches(root, tmp_path)
    update_duplicate_groups(layout, ["batch-a", "batch-b"], threshold=0.95)
    pairs_a = layout.duplicate_pairs_path("batch-a").stat().st_mtime_ns

    again = update_duplicate_groups(layout, ["batch-a", "batch-b"], threshold=0.95)
    assert again.recomputed == [] and again.reused == ["batch-a", "batch-b"] and again.groups == 4

    # batch-b changes: a new copy of orig-5 arrives and the cropped copy of orig-1 goes away
    recoloured(Image.open(root / "batch-a" / "orig-5.png").convert("RGB")).save(root / "batch-b" / "late-5.png")
    (root / "batch-b" / "cropped-1.png").unlink()
    write_descriptor_embeddings(root, layout, "batch-b")
    waiting = update_duplicate_groups(layout, ["batch-a", "batch-b"], threshold=0.95)
    assert waiting.waiting_for_index == ["batch-b"]  # stale shard: left out, never mixed with the old one
    ann_index.build_batch_shard(layout, "batch-b")
    changed = update_duplicate_groups(layout, ["batch-a", "batch-b"], threshold=0.95)
    assert changed.recomputed == ["batch-b"] and changed.reused == ["batch-a"]
    assert layout.duplicate_pairs_path("batch-a").stat().st_mtime_ns == pairs_a  # the neighbour was not re-queried

    found = {m[0][0]: sorted(p for p, _, _ in m[1:]) for m in groups_in_duckdb(layout).values()}
    expected = {o: sorted(c) for o, c in expected.items() if o != "batch-a/orig-1.png"}
    expected["batch-a/orig-5.png"] = ["batch-b/late-5.png"]
    assert found == expected

    # a removed batch takes its pairs (and the groups only it made) with it
    removed = update_duplicate_groups(layout, ["batch-a"], threshold=0.95)
    assert removed.groups == 1 and not layout.duplicate_pairs_path("batch-b").exists()


def test_a_chain_of_look_alikes_is_not_grouped_through_its_middle_image(tmp_path):
    """a ~ b and b ~ c at the threshold, a and c far below it: a's group holds b only; c is left alone."""
    layout = DataLayout(tmp_path / "data")
    dim = 16
    a = np.eye(dim, dtype=np.float32)[0]
    c = np.eye(dim, dtype=np.float32)[1]
    b = (a + c) / np.linalg.norm(a + c)  # cosine 0.707 to each
    d = (a + 0.2 * np.eye(dim, dtype=np.float32)[2]) / np.linalg.norm(a + 0.2 * np.eye(dim, dtype=np.float32)[2])
    ids = write_vectors(layout, "batch-1", np.stack([a, b, c, d]))
    ann_index.build_batch_shard(layout, "batch-1")
    summary = update_duplicate_groups(layout, ["batch-1"], threshold=0.7)
    groups = groups_in_duckdb(layout)
    assert summary.groups == 1 and list(groups) == [ids[0]]
    members = groups[ids[0]]
    assert [m[2] >= 0.7 for m in members] == [True] * 3 and len(members) == 3  # a, then b and d: never c
    with connect(layout.duckdb_path, read_only=True) as con:
        grouped = {r[0] for r in con.execute("SELECT image_id FROM duplicate_groups").fetchall()}
    assert grouped == {ids[0], ids[1], ids[3]}


def test_ivf_shards_find_planted_copies_across_batches_and_answer_queries(tmp_path):
    """Two batches large enough for IVF-PQ shards; 40 vectors of batch-2 are slightly moved copies
    of batch-1 vectors (cosine ~0.97), everything else is random (cosine ~0 in 128 dimensions)."""
    layout = DataLayout(tmp_path / "data")
    n, dim = ann_index.MIN_ROWS_FOR_IVF, 128
    one, two = planted(n, dim, 1), planted(n, dim, 2)
    sources = np.random.default_rng(3).choice(n, 40, replace=False)
    moved = one[sources] + 0.25 * planted(40, dim, 4)
    two[:40] = moved / np.linalg.norm(moved, axis=1, keepdims=True)
    ids_one, ids_two = write_vectors(layout, "batch-1", one), write_vectors(layout, "batch-2", two)
    for batch in ("batch-1", "batch-2"):
        summary = ann_index.build_batch_shard(layout, batch)
        assert summary.kind == ann_index.KIND_IVF and summary.bytes_per_vector < dim * 4 / 4

    result = update_duplicate_groups(layout, ["batch-1", "batch-2"], threshold=0.9)
    with connect(layout.duckdb_path, read_only=True) as con:
        found = set(con.execute(
            "SELECT a.image_id, b.image_id FROM duplicate_groups a JOIN duplicate_groups b USING (group_id) "
            "WHERE a.position = 0 AND b.position = 1").fetchall())
    assert found == {(ids_one[s], ids_two[i]) for i, s in enumerate(sources)}
    assert result.groups == 40

    # a query through the shards: a planted copy's nearest stored images are itself and its source
    hits = ann_index.approximate_top_k(layout, [layout.embeddings_path(b) for b in ("batch-1", "batch-2")],
                                       two[0], k=2)
    assert [h[1] for h in hits] == [ids_two[0], ids_one[sources[0]]]
    assert hits[0][0] == pytest.approx(1.0, abs=1e-5) and hits[1][0] == pytest.approx(float(two[0] @ one[sources[0]]), abs=1e-5)


def test_search_through_the_index_matches_exact_search_and_falls_back_for_stale_shards(settings, clip, classified):
    from clip_assets.search.query import search

    def same(hits, expected):
        assert [(h.image_id, h.path, h.batch) for h in hits] == [(h.image_id, h.path, h.batch) for h in expected]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in expected], rtol=1e-5)

    exact = search(settings, text="a red circle", k=5, clip=clip, exact=True)
    through_index = settings.model_copy(update={"exact_search_below": 0})
    for batch in ("batch-001", "batch-002"):
        ann_index.build_batch_shard(classified, batch)
    same(search(through_index, text="a red circle", k=5, clip=clip), exact)
    classified.embeddings_path("batch-002").touch()  # newer than its shard: scored exactly instead
    assert not ann_index.is_fresh(classified, "batch-002") and ann_index.is_fresh(classified, "batch-001")
    same(search(through_index, text="a red circle", k=5, clip=clip), exact)


def test_assets_through_dagster_build_shards_then_groups_and_rerun_only_what_changed(settings, classified, instance):
    defs = build_definitions(settings)
    register_batches(instance, ["batch-001", "batch-002"])
    for batch in ("batch-001", "batch-002"):
        indexed = materialize(defs, instance, [dg.AssetKey("image_search_index")], partition_key=batch)
        meta = indexed.asset_materializations_for_node("image_search_index")[0].metadata
        # a collection this small has no codec: the partition says why, and names no index file
        assert meta["kind"].value == ann_index.KIND_EXACT and "no index codec yet" in meta["why_exact"].value
        assert "path" not in meta and not classified.ann_shard_path(batch).exists()
    assert ann_index.is_fresh(classified, "batch-001") and ann_index.is_fresh(classified, "batch-002")
    first = materialize(defs, instance, [dg.AssetKey("near_duplicates")])
    meta = first.asset_materializations_for_node("near_duplicates")[0].metadata
    assert meta["recomputed_batches"].value == 2
    page = meta["page"].value
    assert page.endswith("index.html")
    with connect(classified.duckdb_path, read_only=True) as con:
        con.execute("SELECT * FROM near_duplicate_groups").fetchall()  # the view exists and answers
    second = materialize(defs, instance, [dg.AssetKey("near_duplicates")])
    meta = second.asset_materializations_for_node("near_duplicates")[0].metadata
    assert meta["recomputed_batches"].value == 0 and meta["reused_batches"].value == 2

    # a page per run, the newest few kept: the asset re-runs after every new batch
    for _ in range(KEEP_DUPLICATES_PAGES):
        last = materialize(defs, instance, [dg.AssetKey("near_duplicates")])
    pages = sorted(p.name for p in classified.duplicates_page_dir("x").parent.iterdir())
    assert len(pages) == KEEP_DUPLICATES_PAGES and last.run_id in pages and first.run_id not in pages


def test_duplicates_page_shows_groups_side_by_side(copies, tmp_path):
    root, expected = copies
    layout = indexed_batches(root, tmp_path)
    update_duplicate_groups(layout, ["batch-a", "batch-b"], threshold=0.95)
    page = write_duplicates_page(layout, root, tmp_path / "page")
    text = page.read_text()
    assert text.count('class="group"') == 4
    assert text.count('<figure class="match"') == 4 and text.count('<figure class="duplicate"') == 4  # green first, orange others
    for original, others in expected.items():
        assert all(html_path in text for html_path in [original, *others])
    assert len(list((tmp_path / "page" / "thumbs").glob("*.jpg"))) == 8
    if CHROMIUM is None:
        pytest.skip("chromium is not installed: the page was checked as text only")
    dom = chromium_dump_dom(page, tmp_path)
    assert int(re.search(r'data-images-loaded="(\d+)"', dom)[1]) == 8
