"""The gallery reads every batch's manifest: a damaged one is left out with a warning naming it and the
command that rebuilds it, and the other batches' images are shown. Each kind of damage is tried
(clip_assets_tests.support.damage)."""

from __future__ import annotations

import pytest

from clip_assets.ingest.steps import write_manifest
from clip_assets.pages.gallery import gallery_rows
from clip_assets_tests.support.damage import DAMAGES, damage


@pytest.mark.parametrize("how", DAMAGES)
def test_the_gallery_leaves_a_batch_with_a_damaged_manifest_out_and_shows_the_others(how, settings, classified, caplog):
    whole = gallery_rows(classified, 3, 2)
    assert {image.batch for images in whole.values() for image in images} == {"batch-001", "batch-002"}
    manifest = classified.manifest_path("batch-001")
    damage(manifest, how)

    rows = gallery_rows(classified, 3, 2)
    assert rows.keys() == whole.keys()
    assert {image.batch for images in rows.values() for image in images} == {"batch-002"}
    assert all(image.path.startswith("batch-002/") for images in rows.values() for image in images)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert str(manifest) in warning and "--select image_manifest --partition batch-001" in warning

    write_manifest(settings.image_root, classified, "batch-001")  # what `image_manifest --partition` runs
    assert gallery_rows(classified, 3, 2) == whole
