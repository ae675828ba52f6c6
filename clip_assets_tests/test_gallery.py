"""The gallery page: written from real classifications, opened in headless Chromium."""

import re
import shutil
import subprocess

import dagster as dg
import pytest
from PIL import Image

from clip_assets.defs.execution import materialize, materialize_everything
from clip_assets.definitions import build_definitions
from clip_assets.gallery import THUMBNAIL_PX, gallery_rows, write_gallery

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_gallery_shows_matches_and_near_misses_as_small_thumbnails(settings, classified, tmp_path):
    rows = gallery_rows(classified, matched_per_category=3, near_misses=2)
    for images in rows.values():
        matched = [i for i in images if i.matched]
        misses = [i for i in images if not i.matched]
        assert len(matched) <= 3 and len(misses) <= 2 and matched + misses == images
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


def chromium_dump_dom(page, tmp_path) -> str:
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_gallery_asset_page_loads_with_its_images_in_chromium(settings, tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        defs = build_definitions(settings)
        materialize_everything(defs, instance, ["batch-001"])
        result = materialize(defs, instance, [dg.AssetKey("classification_gallery")])
        page = settings.data_dir / "gallery" / result.run_id / "index.html"
        assert page.is_file()
    dom = chromium_dump_dom(page, tmp_path)
    total = int(re.search(r'data-images-total="(\d+)"', dom)[1])
    loaded = int(re.search(r'data-images-loaded="(\d+)"', dom)[1])
    assert total > 0 and loaded == total
    assert "near misses" in dom
