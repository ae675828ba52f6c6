"""A classification's writes land together: with any number of categories the step succeeds and its
pictures fit (they draw the first categories and say so), and a picture that cannot be drawn is a
warning of a step that succeeded, never a failed step whose rows DuckDB already holds."""

from __future__ import annotations

import base64
import io

import dagster as dg
import pytest
from PIL import Image

from clip_assets.classification.steps import CONTACT_SHEET, SCORE_DISTRIBUTION, write_classifications
from clip_assets.config.layout import DataLayout
from clip_assets.definitions import build_definitions
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.steps import write_embeddings
from clip_assets.ingest.steps import write_manifest
from clip_assets.instance.execution import materialize, register_batches
from clip_assets.pages.plots import MAX_CATEGORIES_DRAWN
from clip_assets.storage.warehouse import connect
from clip_assets_tests.support.synthetic_centroids import store_synthetic_centroids

CATEGORIES = 1_200  # a contact sheet of every one would be 81,614 pixels tall: JPEG stops at 65,500
JPEG_MAX_PX = 65_500
BATCH = "batch-001"


@pytest.fixture
def many_categories(settings, clip) -> DataLayout:
    """batch-001's ten real images embedded by the tiny model, and 1,200 categories of that model."""
    layout = DataLayout(settings.data_dir)
    write_manifest(settings.image_root, layout, BATCH)
    write_embeddings(clip, settings.image_root, layout, BATCH, EncodeOptions(batch_size=8, num_workers=0))
    store_synthetic_centroids(layout, CATEGORIES, clip.embed_dim, clip.identity)
    return layout


def stored_rows(layout: DataLayout) -> int:
    with connect(layout.duckdb_path, read_only=True) as con:
        return con.execute("SELECT count(*) FROM image_classifications WHERE batch = ?", [BATCH]).fetchone()[0]


def decoded(markdown: str) -> bytes:
    return base64.b64decode(markdown.split("base64,")[1].rstrip(")"))


def test_a_run_with_1200_categories_succeeds_with_pictures_that_say_what_they_leave_out(
    settings, instance, many_categories
):
    defs = build_definitions(settings)
    register_batches(instance, [BATCH])
    result = materialize(defs, instance, [dg.AssetKey("image_classifications")], partition_key=BATCH)
    assert result.success
    assert stored_rows(many_categories) == 10 * CATEGORIES  # DuckDB and Dagster agree: done
    meta = (
        instance.fetch_materializations(dg.AssetKey("image_classifications"), limit=1)
        .records[0]
        .asset_materialization.metadata
    )
    assert "figure_warnings" not in meta
    assert len(meta["matches_per_category"].value.records) == CATEGORIES  # the tables hold every category
    note = f"first {MAX_CATEGORIES_DRAWN} of 1,200 categories"
    for name, kind in ((CONTACT_SHEET, "JPEG"), (SCORE_DISTRIBUTION, "PNG")):
        markdown = meta[name].value
        assert note in markdown.split("](")[0]  # the caption says so
        with Image.open(io.BytesIO(decoded(markdown))) as picture:
            assert picture.format == kind and picture.height < 10_000
    assert len(decoded(meta[CONTACT_SHEET].value)) < 400_000  # it lives in the event log


def test_a_picture_that_cannot_be_drawn_is_a_warning_and_the_rows_are_stored(settings, many_categories):
    """Every category drawn (no cap): the contact sheet passes JPEG's limit, a real encoder error. The
    step still returns, with the rows committed and the failure in its figure warnings."""
    summary = write_classifications(many_categories, BATCH, image_root=settings.image_root, max_categories_drawn=None)
    assert summary.rows == stored_rows(many_categories) == 10 * CATEGORIES
    assert CONTACT_SHEET not in summary.pictures and SCORE_DISTRIBUTION in summary.pictures  # PNG has no such limit
    [warning] = summary.figure_warnings
    assert warning.startswith("the contact sheet picture not made (OSError: broken data stream")  # Pillow's words
    assert f"{10 * CATEGORIES} classification rows are stored and the step succeeded" in warning


def test_the_contact_sheet_of_a_batch_with_1200_categories_fits_a_jpeg(settings, many_categories):
    summary = write_classifications(many_categories, BATCH, image_root=settings.image_root)
    assert summary.figure_warnings == []
    with Image.open(io.BytesIO(summary.pictures[CONTACT_SHEET].data)) as sheet:
        assert sheet.height < JPEG_MAX_PX
        colours = sheet.convert("RGB").getcolors(maxcolors=1 << 20) or []
        assert len(colours) > 100  # real thumbnails, not an empty grid
    assert summary.pictures[CONTACT_SHEET].caption.endswith(
        f"first {MAX_CATEGORIES_DRAWN} of 1,200 categories (prompt order); the gallery page shows them all"
    )
