"""Near-duplicates in tiers: exact copies, copies (the learnt copy threshold and the perceptual hash),
look-alikes; the copy threshold learnt per model; the choices a person makes and the files they leave.

Generated photo-like images, real copies of them made with Pillow (re-encoded, resized down and up,
slightly cropped, recoloured, saved in another format, and byte-for-byte), and look-alikes (photo-like
images of other seeds: the same kind of picture, a different one), embedded by the real embedding step
with the tiny architecture's random-weight checkpoints. Random weights put every image within 1e-5 of
every other (cosine); the learnt threshold finds where this model's copies sit all the same, and the
hash tells the rest apart.
"""

from __future__ import annotations

import csv
import io
import shutil

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from clip_assets.config.layout import DataLayout
from clip_assets.definitions import build_definitions
from clip_assets.demo.shapes import COPY_KINDS, write_collection
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.perceptual_hash import (
    COLOUR_DISTANCE_BOUND,
    colour_distance,
    colour_layout,
    hamming,
    perceptual_hash,
)
from clip_assets.embedding.steps import write_embeddings
from clip_assets.ingest.steps import write_manifest
from clip_assets.instance.execution import materialize, register_batches
from clip_assets.model.clip_model import load_clip_model
from clip_assets.search import ann_index, duplicate_choices
from clip_assets.search.copy_threshold import CopyThreshold, choose_threshold, learn_copy_threshold, rates
from clip_assets.search.near_duplicates import update_duplicate_groups
from clip_assets.storage.warehouse import connect, read_duplicate_groups
from clip_assets_tests.support.images import photo_like
from clip_assets_tests.support.models import TINY
from clip_assets_tests.support.s3_server import upload

BATCHES = ["batch-a", "batch-b"]
COPIES = {  # the copy in batch-b -> its original in batch-a
    "batch-b/jpeg-00.jpg": "batch-a/orig-00.jpg",
    "batch-b/small-01.jpg": "batch-a/orig-01.jpg",
    "batch-b/large-02.jpg": "batch-a/orig-02.jpg",
    "batch-b/crop-03.jpg": "batch-a/orig-03.jpg",
    "batch-b/colour-04.jpg": "batch-a/orig-04.jpg",
    "batch-b/format-05.png": "batch-a/orig-05.jpg",
}
EXACT = {"batch-b/exact-06.jpg": "batch-a/orig-06.jpg", "batch-b/exact-07.jpg": "batch-a/orig-07.jpg"}
LOOK_ALIKES = [f"batch-b/look-{k}.jpg" for k in range(8)]


def write_images(root) -> None:
    """batch-a: 14 originals; batch-b: a copy of each kind of six of them, byte copies of two, 8 look-alikes."""
    (root / "batch-a").mkdir(parents=True)
    (root / "batch-b").mkdir()
    for i in range(14):
        photo_like(256, 192, i).save(root / f"batch-a/orig-{i:02d}.jpg", quality=90)

    def original(i):
        return Image.open(root / f"batch-a/orig-{i:02d}.jpg").convert("RGB")

    original(0).save(root / "batch-b/jpeg-00.jpg", quality=40)
    original(1).resize((154, 115)).save(root / "batch-b/small-01.jpg", quality=90)
    original(2).resize((460, 345)).save(root / "batch-b/large-02.jpg", quality=90)
    original(3).crop((3, 2, 253, 190)).save(root / "batch-b/crop-03.jpg", quality=90)
    ImageEnhance.Color(ImageEnhance.Brightness(original(4)).enhance(1.04)).enhance(0.95).save(
        root / "batch-b/colour-04.jpg", quality=90)
    original(5).save(root / "batch-b/format-05.png")
    for i in (6, 7):
        shutil.copyfile(root / f"batch-a/orig-{i:02d}.jpg", root / f"batch-b/exact-{i:02d}.jpg")
    for k in range(8):
        photo_like(256, 192, 100 + k).save(root / f"batch-b/look-{k}.jpg", quality=90)


def embedded(image_root, data_dir, clip) -> DataLayout:
    layout = DataLayout(data_dir)
    for batch in BATCHES:
        write_manifest(image_root, layout, batch)
        write_embeddings(clip, image_root, layout, batch, EncodeOptions(batch_size=16, num_workers=0))
    return layout


@pytest.fixture(scope="module")
def copies_collection(tmp_path_factory, checkpoint):
    """The images, embedded with the seed-0 checkpoint; returns (image root, layout, clip)."""
    root = tmp_path_factory.mktemp("copies")
    write_images(root / "images")
    clip = load_clip_model(TINY, str(checkpoint), "cpu")
    return root / "images", embedded(root / "images", root / "data", clip), clip


@pytest.fixture
def layout_copy(copies_collection, tmp_path):
    """A copy of the embedded collection's data folder, for a test to change."""
    image_root, layout, clip = copies_collection
    shutil.copytree(layout.data_dir, tmp_path / "data")
    return image_root, DataLayout(tmp_path / "data"), clip


def groups_by_tier(layout) -> dict[str, dict[str, list[str]]]:
    """tier -> {first path: the other paths}."""
    out: dict[str, dict[str, list[str]]] = {}
    for row in read_duplicate_groups(layout.duckdb_path, 1000):
        group = out.setdefault(row["tier"], {}).setdefault(row["group_id"], [])
        group.append(row["path"])
    return {tier: {g[0]: sorted(g[1:]) for g in groups.values()} for tier, groups in out.items()}


def test_exact_copies_are_found_from_the_fingerprints_without_the_model_or_the_index(layout_copy):
    image_root, layout, _ = layout_copy
    assert not any(ann_index.is_fresh(layout, b) for b in BATCHES)  # no shard: nothing to query
    summary = update_duplicate_groups(layout, BATCHES, copy_threshold=0.99, image_root=image_root)
    assert summary.waiting_for_index == BATCHES and summary.pairs == 0
    assert groups_by_tier(layout) == {"exact": {original: [copy] for copy, original in EXACT.items()}}
    rows = read_duplicate_groups(layout.duckdb_path, 100)
    assert all(r["same_bytes"] and r["hash_distance"] == 0 for r in rows)


def test_every_copy_is_grouped_with_its_original_and_no_look_alike_is(layout_copy):
    image_root, layout, clip = layout_copy
    for batch in BATCHES:
        ann_index.build_batch_shard(layout, batch)
    learnt = learn_copy_threshold(clip, image_root, layout, BATCHES)
    learnt.save(layout.copy_threshold_path)
    summary = update_duplicate_groups(layout, BATCHES, image_root=image_root)
    assert summary.copy_threshold == learnt.threshold and summary.copy_threshold_source.startswith("learnt for")

    tiers = groups_by_tier(layout)
    assert tiers["copy"] == {original: [copy] for copy, original in COPIES.items()}
    assert tiers["exact"] == {original: [copy] for copy, original in EXACT.items()}
    in_copy_tier = {p for first, others in tiers["copy"].items() for p in [first, *others]}
    assert not in_copy_tier & set(LOOK_ALIKES)
    look_alikes = {p for first, others in tiers.get("look-alike", {}).items() for p in [first, *others]}
    assert look_alikes & set(LOOK_ALIKES)  # random weights: every picture looks like every other
    assert not look_alikes & in_copy_tier  # an image is in one group only

    rows = {r["path"]: r for r in read_duplicate_groups(layout.duckdb_path, 1000)}
    assert rows["batch-b/large-02.jpg"]["suggested_keep"]  # the largest is kept by default
    assert (rows["batch-b/large-02.jpg"]["width"], rows["batch-b/large-02.jpg"]["height"]) == (460, 345)
    assert rows["batch-a/orig-01.jpg"]["suggested_keep"] and not rows["batch-b/small-01.jpg"]["suggested_keep"]
    assert all(rows[c]["hash_distance"] <= summary.hash_distance for c in COPIES)
    assert all(rows[c]["tier"] == "copy" and rows[c]["similarity"] >= learnt.threshold - 1e-6 for c in COPIES)


def test_the_learnt_threshold_differs_between_models_and_keeps_its_precision_on_held_out_copies(
        copies_collection, other_checkpoint, tmp_path):
    image_root, layout, clip = copies_collection
    other = load_clip_model(TINY, str(other_checkpoint), "cpu")
    other_layout = embedded(image_root, tmp_path / "other", other)
    first = learn_copy_threshold(clip, image_root, layout, BATCHES)
    second = learn_copy_threshold(other, image_root, other_layout, BATCHES)
    for learnt, model in ((first, clip), (second, other)):
        assert learnt.model == model.identity and learnt.threshold is not None
        assert learnt.originals == 30 and learnt.copies == 150 and learnt.copies_in_collection >= 8
        assert learnt.precision >= learnt.target_precision == 0.99
        assert learnt.heldout_precision >= learnt.target_precision  # the half that did not learn it
        assert 0.5 <= learnt.heldout_recall <= 1 and set(learnt.recall_by_kind) == {
            "jpeg", "resize", "crop", "colour", "format"}
    assert first.threshold != second.threshold


def test_the_threshold_is_the_lowest_that_keeps_the_precision_everywhere_above_it():
    positives = np.array([0.99, 0.98, 0.97, 0.96, -np.inf])
    negatives = np.array([0.965, -np.inf, -np.inf, -np.inf, -np.inf])
    # at 0.96 one non-copy in five passes against four copies in five: precision 0.8 / (0.8 + 0.2)
    assert choose_threshold(positives, negatives, 0.85) == pytest.approx(0.97)
    assert rates(0.97, positives, negatives) == pytest.approx((1.0, 0.6))
    assert choose_threshold(positives, negatives, 0.75) == pytest.approx(0.96)
    # no copy above every non-copy: just above the highest non-copy
    assert choose_threshold(np.array([0.5]), np.array([0.9]), 0.99) == pytest.approx(0.9, abs=1e-6)


def test_the_colour_layout_tells_a_picture_from_the_same_layout_in_other_colours_and_ignores_brightness():
    disc_on_blue, disc_on_pink = Image.new("RGB", (96, 96), (180, 190, 240)), Image.new("RGB", (96, 96), (220, 180, 170))
    for img in (disc_on_blue, disc_on_pink):
        ImageDraw.Draw(img).ellipse((28, 28, 68, 68), fill=(20, 160, 40))
    assert hamming(np.array([perceptual_hash(disc_on_blue)]), np.array([perceptual_hash(disc_on_pink)]))[0] <= 4
    assert colour_distance(colour_layout(disc_on_blue), colour_layout(disc_on_pink)) > COLOUR_DISTANCE_BOUND
    brighter = ImageEnhance.Brightness(disc_on_blue).enhance(0.9)
    assert colour_distance(colour_layout(disc_on_blue), colour_layout(brighter)) < 1
    flat_grey, flat_red = Image.new("RGB", (32, 32), (128, 128, 128)), Image.new("RGB", (32, 32), (200, 30, 30))
    assert colour_distance(colour_layout(flat_grey), colour_layout(flat_grey)) == 0
    assert colour_distance(colour_layout(flat_grey), colour_layout(flat_red)) == 100


@pytest.mark.parametrize("where", ["local folder", "bucket"])
def test_the_demos_copy_tier_holds_exactly_its_planted_copies(where, checkpoint, tmp_path, request):
    """The demo's own kind of pictures (shapes on plain and striped backgrounds, where two pictures of
    one shape share their grey layout) and its planted copies of each kind: with a model that tells
    nothing apart (random weights), the hash and the colour layouts alone leave exactly the planted
    copies in the copy tier, the byte copy in the exact tier, and every other pair a look-alike. The
    same with the images in a bucket (the colour layouts and sizes read from the store)."""
    local_root = write_collection(tmp_path / "images", batches=2, per_batch=60, seed=5, copies=len(COPY_KINDS)).parent
    image_root = local_root if where == "local folder" else upload(local_root, request.getfixturevalue("s3_store"), "img")
    clip = load_clip_model(TINY, str(checkpoint), "cpu")
    batches = ["batch-001", "batch-002"]
    layout = DataLayout(tmp_path / "data")
    for batch in batches:
        write_manifest(image_root, layout, batch)
        write_embeddings(clip, image_root, layout, batch, EncodeOptions(batch_size=32, num_workers=0))
        ann_index.build_batch_shard(layout, batch)
    learn_copy_threshold(clip, image_root, layout, batches).save(layout.copy_threshold_path)
    summary = update_duplicate_groups(layout, batches, image_root=image_root)

    planted = {}
    for kind in COPY_KINDS:
        (copy,) = (local_root / "batch-002").glob(f"copy-{kind}-of-*")
        original = next((local_root / "batch-001").glob(copy.name.split("-of-")[1].rsplit(".", 1)[0] + ".*"))
        planted[kind] = (f"batch-001/{original.name}", f"batch-002/{copy.name}")
    tiers = groups_by_tier(layout)
    assert tiers["exact"] == {planted["same-bytes"][0]: [planted["same-bytes"][1]]}
    assert tiers["copy"] == {original: [copy] for kind, (original, copy) in planted.items() if kind != "same-bytes"}
    assert summary.refused_by_colour > 0  # look-alikes the hash alone would have called copies
    assert len(tiers["look-alike"]) > 5  # random weights: everything else looks alike


def test_choices_are_durable_undoable_and_exported_as_the_files_to_remove(layout_copy, cli_env, checkpoint, tmp_path):
    from clip_assets.cli import main
    from clip_assets.config.settings import Settings

    image_root, layout, _ = layout_copy
    for batch in BATCHES:
        ann_index.build_batch_shard(layout, batch)
    update_duplicate_groups(layout, BATCHES, copy_threshold=0.9999, image_root=image_root)
    rows = read_duplicate_groups(layout.duckdb_path, 1000)
    groups = {}
    for r in rows:
        groups.setdefault(r["group_id"], []).append(r)
    store = layout.duplicate_choices_path
    exact_group = next(g for g in groups.values() if g[0]["tier"] == "exact")
    first = duplicate_choices.record_choice(store, exact_group[0]["group_id"], "exact", exact_group[1]["path"],
                                            [r["path"] for r in exact_group], request_id="click-1")
    again = duplicate_choices.record_choice(store, exact_group[0]["group_id"], "exact", exact_group[1]["path"],
                                            [r["path"] for r in exact_group], request_id="click-1")
    assert again == first and len(duplicate_choices.records(store)) == 1  # a retried click lands once
    removals = duplicate_choices.files_to_remove(store, rows, ("exact", "copy"))
    assert [(r["path"], r["keep"]) for r in removals.rows] == [(exact_group[0]["path"], exact_group[1]["path"])]
    cli_env(Settings(image_root=image_root, data_dir=layout.data_dir, prompts_dir=tmp_path, model=TINY,
                     pretrained=str(checkpoint)))
    assert main(["duplicates", "export", "--out", str(tmp_path / "remove.csv")]) == 0
    exported = list(csv.DictReader(open(tmp_path / "remove.csv")))
    assert [(r["path"], r["keep"], r["tier"]) for r in exported] == [
        (exact_group[0]["path"], exact_group[1]["path"], "exact")]
    assert main(["duplicates", "export", "--tiers", "copies"]) == 2  # a tier that does not exist

    duplicate_choices.undo(store, first.record_id)
    assert duplicate_choices.files_to_remove(store, rows).rows == []
    assert [r.action for r in duplicate_choices.records(store)] == ["keep", "undo"]  # nothing deleted
    with pytest.raises(duplicate_choices.DuplicateChoiceError, match="cannot be kept"):
        duplicate_choices.record_choice(store, exact_group[0]["group_id"], "exact", "batch-b/look-0.jpg",
                                        [r["path"] for r in exact_group])
    # a look-alike group's choice is left out unless its tier is asked for
    look = next((g for g in groups.values() if g[0]["tier"] == "look-alike"), None)
    if look is not None:
        duplicate_choices.record_choice(store, look[0]["group_id"], "look-alike", look[0]["path"],
                                        [r["path"] for r in look])
        assert duplicate_choices.files_to_remove(store, rows, ("exact", "copy")).rows == []
        assert len(duplicate_choices.files_to_remove(store, rows).rows) == len(look) - 1
    assert all((image_root / r["path"]).is_file() for r in rows)  # the project never deletes an image


def post_form(url: str, fields: list[tuple[str, str]]) -> tuple[int, str, str]:
    """(status, Location header, body) of a form POST, redirects not followed."""
    import urllib.error
    import urllib.parse
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    request = urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode(), method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=30) as answer:
            return answer.status, answer.headers.get("Location", ""), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Location", ""), exc.read().decode()


def test_the_app_page_stores_a_choice_and_downloads_the_files_to_remove(layout_copy, tmp_path):
    from clip_assets.app.app import running_app
    from clip_assets.config.settings import Settings
    from clip_assets_tests.support.http_requests import get

    image_root, layout, clip = layout_copy
    for batch in BATCHES:
        ann_index.build_batch_shard(layout, batch)
    update_duplicate_groups(layout, BATCHES, copy_threshold=0.9999, image_root=image_root)
    settings = Settings(image_root=image_root, data_dir=layout.data_dir, model=TINY, pretrained="x", device="cpu")
    with running_app(settings, clip=clip, thumbs_dir=tmp_path / "thumbs") as app:
        page = get(app.url + "/duplicates")[2].decode()
        assert "Exact copies" in page and "Copies" in page and "look-alike groups" in page  # behind a link
        assert 'data-tier="look-alike"' not in page
        assert 'data-tier="look-alike"' in get(app.url + "/duplicates?look_alikes=1")[2].decode()
        exact = read_duplicate_groups(layout.duckdb_path, 100, ("exact",))
        group = next(r for r in exact if r["position"] == 1)
        members = [r["path"] for r in exact if r["group_id"] == group["group_id"]]
        fields = [("group_id", group["group_id"]), ("tier", "exact"), ("keep", group["path"]), ("request_id", "r-1")]
        status, location, _ = post_form(app.url + "/duplicates/keep", fields + [("members", m) for m in members])
        assert status == 303 and location.endswith(f"#g-{group['group_id']}")
        assert f"keeping {group['path']}" in get(app.url + "/duplicates")[2].decode()
        status, kind, body = get(app.url + "/duplicates/removals.csv")
        assert status == 200 and kind.startswith("text/csv")
        lines = list(csv.DictReader(io.StringIO(body.decode())))
        assert [(r["path"], r["keep"]) for r in lines] == [(m, group["path"]) for m in members if m != group["path"]]
        refused = post_form(app.url + "/duplicates/keep", [("group_id", group["group_id"]), ("tier", "exact"),
                                                           ("keep", "batch-b/look-0.jpg")] + [("members", m) for m in members])
        assert refused[0] == 400 and "cannot be kept" in refused[2]
        assert "no perceptual hash" not in get(app.url + "/duplicates")[2].decode()

        embeddings = pq.read_table(layout.embeddings_path("batch-b"))  # as if embedded before hashes were stored
        unhashed = pa.nulls(embeddings.num_rows, pa.int64())
        pq.write_table(embeddings.set_column(embeddings.schema.get_field_index("perceptual_hash"), "perceptual_hash",
                                             unhashed), layout.embeddings_path("batch-b"))
        page = get(app.url + "/duplicates")[2].decode()
        assert f"{embeddings.num_rows} images have no perceptual hash" in page and "batch-b" in page


def test_the_assets_learn_the_threshold_once_per_model_and_commit_the_groups_last(copies_collection, tmp_path,
                                                                                   checkpoint, instance):
    from clip_assets.config.settings import Settings

    image_root, layout, _ = copies_collection
    shutil.copytree(layout.data_dir, tmp_path / "data")
    settings = Settings(image_root=image_root, data_dir=tmp_path / "data", model=TINY, pretrained=str(checkpoint),
                        device="cpu", batch_size=16, num_workers=0)
    layout = DataLayout(settings.data_dir)
    for batch in BATCHES:
        ann_index.build_batch_shard(layout, batch)
    defs = build_definitions(settings)
    register_batches(instance, BATCHES)
    learnt = materialize(defs, instance, [dg.AssetKey("copy_threshold")])
    meta = learnt.asset_materializations_for_node("copy_threshold")[0].metadata
    assert meta["learnt_in_this_run"].value is True and meta["heldout_precision"].value >= 0.99
    assert meta["model"].value.startswith("clip-assets-tiny/")
    kept = materialize(defs, instance, [dg.AssetKey("copy_threshold")])
    assert kept.asset_materializations_for_node("copy_threshold")[0].metadata["learnt_in_this_run"].value is False

    done = materialize(defs, instance, [dg.AssetKey("near_duplicates")])
    meta = done.asset_materializations_for_node("near_duplicates")[0].metadata
    assert meta["copy_groups"].value == len(COPIES) and meta["exact_groups"].value == len(EXACT)
    assert meta["copy_threshold"].value == CopyThreshold.load(layout.copy_threshold_path).threshold
    with connect(layout.duckdb_path, read_only=True) as con:
        before = con.execute("SELECT count(*) FROM duplicate_groups").fetchone()[0]

    # the page cannot be written: the step fails and DuckDB's groups stay as they were
    pages = layout.duplicates_page_dir("x").parent
    shutil.rmtree(pages)
    pages.write_text("not a folder")
    for path in layout.duplicate_pairs_dir.glob("*.parquet"):
        path.unlink()  # recomputed: the groups would be written again
    failed = materialize(defs, instance, [dg.AssetKey("near_duplicates")], raise_on_error=False)
    assert not failed.success
    with connect(layout.duckdb_path, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM duplicate_groups").fetchone()[0] == before
