"""The review page in a real headless Chromium driven by Playwright: a review by keyboard, undo,
the clicks landing in the labels store, and the time from a key press to the next card."""

import statistics
import time

import pytest

from clip_assets.tuning.review_labels import current_verdicts, records
from clip_assets_tests.support.browser import chromium_page
from clip_assets_tests.support.chromium import CHROMIUM

NEXT_CARD_LIMIT_MS = 2000  # the aim is 200 ms; two busy cores get a wide margin, the measured time is printed


def wait_settled(page):
    """Every click answered by the server."""
    page.wait_for_function("document.body.dataset.sending === '0'", timeout=30_000)


def press_and_time(page, key: str) -> tuple[str, float, float]:
    """Press `key` on the current card; (the path judged, the page's key-to-next-card ms, the ms seen from here)."""
    judged = page.get_attribute("#card", "data-path")
    page.evaluate("delete document.body.dataset.nextCardMs")
    started = time.perf_counter()
    page.keyboard.press(key)
    page.wait_for_function("document.body.dataset.nextCardMs !== undefined", timeout=10_000)
    outside = (time.perf_counter() - started) * 1000
    return judged, float(page.evaluate("document.body.dataset.nextCardMs")), outside


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_a_review_by_keyboard_stores_each_click_and_shows_the_next_card_fast(server, classified):
    store = classified.review_labels_path
    with chromium_page() as page:
        page.goto(f"{server}/review/circle?queue=improve")
        page.wait_for_selector("#card[data-state=ready] img")
        page.wait_for_function("document.querySelector('#picture img').complete", timeout=10_000)
        timings = []
        judged = {}
        for key, verdict in [("y", "yes"), ("n", "no"), ("y", "yes"), ("s", "skip"), ("n", "no"), ("y", "yes")]:
            path, in_page, outside = press_and_time(page, key)
            judged[path] = verdict
            timings.append((in_page, outside))
            assert page.get_attribute("#card", "data-path") not in judged  # a new card each time
        wait_settled(page)
        now = current_verdicts(store, category="circle")
        assert {path: now[(path, "circle")].verdict for path in judged} == judged
        assert all(now[(path, "circle")].queue == "improve" for path in judged)

        last = list(judged)[-1]  # undo: the last card comes back, and its verdict is taken back by a new record
        page.keyboard.press("u")
        page.wait_for_function(f"document.querySelector('#card').dataset.path === {last!r}", timeout=10_000)
        wait_settled(page)
        assert (last, "circle") not in current_verdicts(store, category="circle")
        assert [r.verdict for r in records(store)][-1] == "undo" and len(records(store)) == len(judged) + 1
        path, _, _ = press_and_time(page, "n")  # and judged again
        assert path == last
        wait_settled(page)
        assert current_verdicts(store, category="circle")[(last, "circle")].verdict == "no"
        assert page.inner_text("#status").startswith(f"{len(judged)} stored")

    in_page = [t[0] for t in timings]
    print(
        f"\nkey press to next card, in the page: median {statistics.median(in_page):.1f} ms, max {max(in_page):.1f} ms;"
        f" seen from the test: median {statistics.median(t[1] for t in timings):.1f} ms"
    )
    assert max(in_page) < NEXT_CARD_LIMIT_MS
