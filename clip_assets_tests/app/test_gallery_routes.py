"""The gallery and near-duplicate pages of the app, from the DuckDB file as it is, with the same
cards as the pages the assets write."""

import re
from urllib.parse import urlencode

from clip_assets.app.app import running_app
from clip_assets.pages.gallery import duplicate_groups, gallery_rows
from clip_assets.search import ann_index
from clip_assets.search.near_duplicates import update_duplicate_groups
from clip_assets_tests.support.chromium import CHROMIUM, chromium_dump_dom
from clip_assets_tests.support.http_requests import get


def cards(page: str) -> list[str]:
    return re.findall(r'<figure class="[^"]+"[^>]*>\s*<img src="/thumb\?path=([^"]+)"', page)


def test_the_gallery_shows_each_categorys_matches_and_near_misses(server, classified):
    status, _, body = get(f"{server}/gallery?" + urlencode({"matched": 3, "near": 2}))
    page = body.decode()
    assert status == 200
    rows = gallery_rows(classified, 3, 2)
    for category, images in rows.items():
        section = page.split(f'<section id="{category}">')[1].split("</section>")[0]
        assert cards(section) == [i.path for i in images if i.matched] + [
            i.path
            for kind in ("under_threshold", "not_above_neutral", "not_in_top_k")
            for i in images
            if i.failed == kind
        ]
    for path in cards(page)[:3]:
        assert get(f"{server}/thumb?path={path}")[:2] == (200, "image/jpeg")
    assert get(f"{server}/gallery?matched=lots")[0] == 400


def test_the_gallery_before_anything_is_classified_says_what_to_run(settings, clip, tmp_path):
    with running_app(settings, clip=clip, thumbs_dir=tmp_path / "t") as app:
        status, _, body = get(f"{app.url}/gallery")
        assert status == 404 and "materialize image_classifications" in body.decode()
        status, _, body = get(f"{app.url}/duplicates")
        assert status == 404 and "materialize near_duplicates" in body.decode()


def test_the_duplicates_page_shows_the_groups_in_duckdb(server, classified, tmp_path):
    status, _, body = get(f"{server}/duplicates")
    assert status == 200 and "no near-duplicates" in body.decode()  # classified, never grouped
    for batch in ("batch-001", "batch-002"):
        ann_index.build_batch_shard(classified, batch)
    update_duplicate_groups(classified, ["batch-001", "batch-002"], threshold=0.9)
    groups = duplicate_groups(classified)
    assert groups, "the tiny random model sees look-alikes at 0.9"
    status, _, body = get(f"{server}/duplicates?look_alikes=1")  # the random model's groups are look-alikes
    page = body.decode()
    assert status == 200 and page.count('class="group"') == len(groups)
    assert cards(page) == [i.path for group in groups for i in group.images]
    if CHROMIUM is not None:
        dom = chromium_dump_dom(f"{server}/duplicates?look_alikes=1", tmp_path)
        assert int(re.search(r'data-images-loaded="(\d+)"', dom)[1]) == len(cards(page))
