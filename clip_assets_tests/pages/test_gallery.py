"""The gallery page: written from real classifications, opened in headless Chromium."""

import io
import re

import dagster as dg
import pytest
from PIL import Image

from clip_assets.classification.near_misses import NOT_ABOVE_NEUTRAL, UNDER_THRESHOLD
from clip_assets.classification.steps import write_centroids, write_classifications
from clip_assets.config.layout import DataLayout
from clip_assets.definitions import build_definitions
from clip_assets.instance.execution import materialize, materialize_everything
from clip_assets.pages.gallery import (
    SHEET_THUMB_PX,
    THUMBNAIL_PX,
    category_settings,
    contact_sheet,
    gallery_rows,
    write_gallery,
)
from clip_assets.storage.warehouse import connect
from clip_assets_tests.support.chromium import CHROMIUM, chromium_dump_dom
from clip_assets_tests.support.synthetic_collection import tied_collection


def test_gallery_shows_matches_and_near_misses_as_small_thumbnails(settings, classified, tmp_path):
    rows = gallery_rows(classified, matched_per_category=3, near_misses=2)
    for images in rows.values():
        matched = [i for i in images if i.matched]
        misses = [i for i in images if not i.matched]
        assert len(matched) <= 3 and matched + misses == images
        assert all(sum(i.failed == kind for i in misses) <= 2 for kind in (UNDER_THRESHOLD, NOT_ABOVE_NEUTRAL))
        assert [i.score for i in matched] == sorted((i.score for i in matched), reverse=True)
    page = write_gallery(classified, settings.image_root, tmp_path / "gallery", matched_per_category=3, near_misses=2)
    text = page.read_text()
    shown = {i.image_id for images in rows.values() for i in images}
    thumbs = list((tmp_path / "gallery" / "thumbs").glob("*.jpg"))
    assert {t.stem for t in thumbs} == shown and len(shown) > 0
    for thumb in thumbs:
        with Image.open(thumb) as img:
            assert max(img.size) <= THUMBNAIL_PX
    assert all(f'<section id="{name}">' in text for name in rows)
    assert text.count("<figure") == sum(len(v) for v in rows.values())


def _unmatched(layout, category):
    """Every unmatched image of a category: (image_id, score, threshold, pos_sim, neutral_sim, margin)."""
    with connect(layout.duckdb_path, read_only=True) as con:
        return con.execute(
            "SELECT image_id, score, threshold, pos_sim, neutral_sim, neutral_margin FROM image_classifications "
            "WHERE category = ? AND NOT matched", [category]).fetchall()


def _median(layout, sql_value, category):
    with connect(layout.duckdb_path, read_only=True) as con:
        return con.execute(
            f"SELECT median({sql_value}) FROM image_classifications WHERE category = ?", [category]).fetchone()[0]


def test_near_misses_are_split_by_the_condition_that_failed(settings, classified, clip, tmp_path):
    """Thresholds set from the data (calibrated_thresholds.toml): circle's threshold below every score
    and its neutral margin at the median, so half its images fail the neutral condition only; square's
    threshold at its median score and no margin, so half fail the threshold only."""
    margin = _median(classified, "pos_sim - neutral_sim", "circle")
    threshold = _median(classified, "score", "square")
    (settings.prompts_dir / "calibrated_thresholds.toml").write_text(
        f"[categories.circle]\nthreshold = -2.0\nneutral_margin = {margin}\n"
        f"[categories.square]\nthreshold = {threshold}\nneutral_margin = -2.0\n")
    write_centroids(clip, settings.prompts_dir, classified)
    for batch in ("batch-001", "batch-002"):
        write_classifications(classified, batch)

    rows = gallery_rows(classified, matched_per_category=3, near_misses=50)
    for name, kind in (("circle", NOT_ABOVE_NEUTRAL), ("square", UNDER_THRESHOLD)):
        unmatched = _unmatched(classified, name)
        assert len(unmatched) >= 5  # about half of 20 images
        assert {i.image_id for i in rows[name] if not i.matched} == {r[0] for r in unmatched}
        assert {i.failed for i in rows[name] if not i.matched} == {kind}
    for name, images in rows.items():  # every near miss is filed under the condition it failed
        facts = {r[0]: r for r in _unmatched(classified, name)}
        for image in (i for i in images if not i.matched):
            _, score, threshold, pos, neutral, margin = facts[image.image_id]
            assert image.failed == (UNDER_THRESHOLD if score < threshold else NOT_ABOVE_NEUTRAL), (name, facts[image.image_id])

    text = write_gallery(classified, settings.image_root, tmp_path / "gallery", near_misses=50).read_text()
    assert "best scores under the threshold" not in text
    neutral_heading = "near misses: score reaches the threshold, but the image is not above the neutral descriptions"
    for name, kind in (("circle", NOT_ABOVE_NEUTRAL), ("square", UNDER_THRESHOLD)):
        section = text.split(f'<section id="{name}">')[1].split("</section>")[0]
        under, neutral = section.split("near misses: score under the threshold")[1].split(neutral_heading)
        unmatched = len(_unmatched(classified, name))
        assert (under.count("<figure"), neutral.count("<figure")) == (
            (0, unmatched) if kind == NOT_ABOVE_NEUTRAL else (unmatched, 0))


def test_contact_sheet_shows_a_batch_in_a_few_tens_of_kilobytes(settings, classified):
    sheet = contact_sheet(classified, settings.image_root, "batch-001")
    assert sheet.startswith(b"\xff\xd8\xff") and len(sheet) < 60_000
    with Image.open(io.BytesIO(sheet)) as img:
        categories = len(category_settings(classified))
        assert img.height >= categories * SHEET_THUMB_PX and img.width < 1000
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20) or []
        assert len(colours) > 100  # thumbnails drawn, not an empty grid


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_gallery_asset_page_loads_with_its_images_in_chromium(settings, tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        defs = build_definitions(settings)
        materialize_everything(defs, instance, ["batch-001"])
        result = materialize(defs, instance, [dg.AssetKey("classification_gallery")])
        page = DataLayout(settings.data_dir).gallery_dir(result.run_id) / "index.html"
        assert page.is_file()
    dom = chromium_dump_dom(page.as_uri(), tmp_path)
    total = int(re.search(r'data-images-total="(\d+)"', dom)[1])
    loaded = int(re.search(r'data-images-loaded="(\d+)"', dom)[1])
    assert total > 0 and loaded == total
    assert "near misses: score under the threshold" in dom


def _best_by_sorting_every_row(layout, matched_per_category, near_misses, batch=None):
    """The gallery's choice the slow way: every row fetched, sorted per category and condition in Python."""
    from clip_assets.classification.near_misses import FAILED_CONDITION_SQL

    with connect(layout.duckdb_path, read_only=True) as con:
        rows = con.execute(f"""
            SELECT c.category, c.image_id, c.batch, coalesce(c.probability, c.score), c.matched, {FAILED_CONDITION_SQL},
                   c.pos_sim - c.neutral_sim, p.position, m.path
            FROM image_classifications c JOIN prompt_categories p USING (category)
                 JOIN read_parquet(?) m USING (image_id)""", [layout.manifests_glob]).fetchall()
    groups: dict = {}
    for r in rows:
        if batch is None or r[2] == batch:
            groups.setdefault((r[7], r[0], r[5]), []).append(r)
    out: dict[str, list[tuple]] = {}
    for (_, category, failed), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2] is not None, kv[0][2] or "")):
        members.sort(key=lambda r: (-r[3], r[1]))
        keep = matched_per_category if failed is None else near_misses
        out.setdefault(category, []).extend(
            (r[1], r[8], r[2], round(r[3], 6), bool(r[4]), r[5], None if r[6] is None else round(r[6], 6))
            for r in members[:keep])
    return out


@pytest.mark.parametrize("matched, near, batch", [(3, 2, None), (5, 0, None), (2, 4, "b1"), (1000, 1000, None)])
def test_gallery_rows_are_the_best_of_every_row_with_ties_broken_by_image_id(tmp_path, matched, near, batch):
    layout = tied_collection(tmp_path)
    got = gallery_rows(layout, matched, near, batch=batch)
    expected = _best_by_sorting_every_row(layout, matched, near, batch)
    assert {c: [(i.image_id, i.path, i.batch, round(i.score, 6), i.matched, i.failed,
                 None if i.above_neutral is None else round(i.above_neutral, 6)) for i in images]
            for c, images in got.items() if images} == expected
    kinds = {i.failed for images in got.values() for i in images}
    assert kinds == {None} if near == 0 else {None, UNDER_THRESHOLD, NOT_ABOVE_NEUTRAL} <= kinds
