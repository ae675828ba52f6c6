"""The review endpoints of the app: clicks stored at once in the real SQLite labels store, a retried
click stored once, undo as a new record, the queues' cards and the estimates as the labels store gives them."""

import json
import re
import threading
import uuid
from urllib.parse import quote

import pytest

from clip_assets.tuning.review_labels import current_verdicts, records
from clip_assets_tests.support.http_requests import get, post_json, raw_request


def some_paths(settings, n=3) -> list[str]:
    return sorted(p.relative_to(settings.image_root).as_posix() for p in settings.image_root.glob("batch-001/*.png"))[
        :n
    ]


def click(server, path, verdict, category="circle", queue="improve", request_id=None):
    return post_json(
        f"{server}/api/review/verdicts",
        {
            "request_id": request_id or uuid.uuid4().hex,
            "path": path,
            "category": category,
            "verdict": verdict,
            "queue": queue,
            "prompt_version": "pv-1",
        },
    )


def test_a_click_is_stored_at_once_and_a_retry_is_stored_once(server, settings, classified, clip):
    store = classified.review_labels_path
    path = some_paths(settings)[0]
    request_id = uuid.uuid4().hex
    status, answer = click(server, path, "yes", request_id=request_id)
    assert status == 200
    stored = records(store)
    assert len(stored) == 1 and stored[0].record_id == answer["record"]["record_id"]
    assert (stored[0].path, stored[0].category, stored[0].verdict, stored[0].queue) == (
        path,
        "circle",
        "yes",
        "improve",
    )
    assert stored[0].model == clip.identity and stored[0].prompt_version == "pv-1" and stored[0].batch == "batch-001"
    again = click(server, path, "yes", request_id=request_id)  # the same click, retried
    assert again == (200, answer) and len(records(store)) == 1
    status, refused = click(server, path, "no", request_id=request_id)  # the id of another click
    assert status == 400 and "new request id" in refused["error"] and len(records(store)) == 1


def test_undo_is_a_new_record_and_the_verdict_before_comes_back(server, settings, classified):
    store = classified.review_labels_path
    path = some_paths(settings)[0]
    first = click(server, path, "no")[1]["record"]
    second = click(server, path, "yes")[1]["record"]
    assert current_verdicts(store)[(path, "circle")].verdict == "yes"
    status, answer = post_json(
        f"{server}/api/review/undo", {"request_id": uuid.uuid4().hex, "record_id": second["record_id"]}
    )
    assert status == 200 and answer["record"]["verdict"] == "undo" and answer["record"]["undoes"] == second["record_id"]
    assert [r.verdict for r in records(store)] == ["no", "yes", "undo"]  # nothing deleted
    assert current_verdicts(store)[(path, "circle")].record_id == first["record_id"]
    status, answer = post_json(f"{server}/api/review/undo", {"request_id": uuid.uuid4().hex, "record_id": 999})
    assert status == 400 and "No record 999" in answer["error"]


def test_two_tabs_clicking_at_once_lose_nothing(server, settings, classified):
    paths = some_paths(settings, 8)
    answers = []

    def tab(verdict):
        for path in paths:
            answers.append(click(server, path, verdict, category="square"))

    tabs = [threading.Thread(target=tab, args=(v,)) for v in ("yes", "no")]
    [t.start() for t in tabs]
    [t.join(60) for t in tabs]
    assert len(paths) >= 4 and [status for status, _ in answers] == [200] * 2 * len(paths)
    stored = records(classified.review_labels_path)
    assert len(stored) == 2 * len(paths) and len({r.record_id for r in stored}) == 2 * len(paths)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"path": "batch-001/a.png", "category": "circle", "verdict": "maybe", "queue": "improve"},
            "verdict is one of",
        ),
        (
            {"path": "../outside.png", "category": "circle", "verdict": "yes", "queue": "improve"},
            "relative to the image root",
        ),
        (
            {"path": "batch-001/a.png", "category": "circle", "verdict": "yes", "queue": "import"},
            "queue must be one of",
        ),
        ({"path": "batch-001/a.png", "category": "", "verdict": "yes", "queue": "estimate"}, "needs a category"),
    ],
)
def test_a_bad_click_is_refused_with_the_reason_and_stores_nothing(server, classified, body, message):
    status, answer = post_json(f"{server}/api/review/verdicts", {"request_id": uuid.uuid4().hex, **body})
    assert status == 400 and message in answer["error"]
    assert records(classified.review_labels_path) == []


def test_a_click_without_a_request_id_or_with_a_huge_body_is_refused(server, classified):
    status, answer = post_json(
        f"{server}/api/review/verdicts",
        {"path": "batch-001/a.png", "category": "circle", "verdict": "yes", "queue": "improve"},
    )
    assert status == 400 and "request_id" in answer["error"]
    head = (
        b"POST /api/review/verdicts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 50000000\r\n\r\n"
    )
    assert raw_request(server, head).split(b" ", 2)[1] == b"413"
    assert records(classified.review_labels_path) == []


def test_a_corrupt_labels_store_is_a_clear_error_and_is_left_as_it_is(server, settings, classified):
    store = classified.review_labels_path
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_bytes(b"this is not a SQLite file" * 100)
    status, answer = click(server, some_paths(settings)[0], "yes")
    assert status == 400 and str(store) in answer["error"]
    assert store.read_bytes() == b"this is not a SQLite file" * 100


def cards_of(server, category, queue, n=50):
    status, _, body = get(f"{server}/api/review/{quote(category)}/cards?queue={queue}&n={n}")
    assert status == 200, body
    return json.loads(body)["cards"]


def test_the_cards_are_the_queues_of_the_labels_store_without_what_was_judged(server, classified):
    improve = cards_of(server, "circle", "improve")
    expected = review_labels_queue = __import__("clip_assets.tuning.review_queues", fromlist=["x"])
    assert [c["path"] for c in improve] == [i.path for i in review_labels_queue.improve_queue(classified, "circle", 50)]
    assert all(c["thumb"] == f"/thumb?path={quote(c['path'], safe='/')}&size=384" for c in improve)
    assert all("the pipeline says" in c["detail"] for c in improve)
    estimate = cards_of(server, "circle", "estimate")
    assert [c["path"] for c in estimate] == [i.path for i in expected.estimate_queue(classified, "circle", 50)]
    assert all(c["detail"] == "" for c in estimate)  # the decision is not shown where it could sway the answer
    first = improve[0]
    click(server, first["path"], "no", queue="improve")
    assert first["path"] not in [c["path"] for c in cards_of(server, "circle", "improve")]
    assert first["path"] in [c["path"] for c in cards_of(server, "circle", "estimate")]  # improve labels stay out of it
    assert get(f"{server}/api/review/circle/cards?queue=sideways")[0] == 400
    assert get(f"{server}/api/review/no-such/cards?queue=improve")[0] == 404


def test_the_estimates_table_comes_from_the_estimate_queues_labels(server, settings, classified):
    for card in cards_of(server, "circle", "estimate", 6):
        click(server, card["path"], "yes", queue="estimate")
    status, _, body = get(f"{server}/api/review/estimates")
    rows = {row["category"]: row for row in json.loads(body)["estimates"]}
    assert status == 200 and rows["circle"]["labelled_matches"] + rows["circle"]["labelled_non_matches"] == 6
    assert rows["square"]["labelled_matches"] + rows["square"]["labelled_non_matches"] == 0
    status, _, body = get(f"{server}/review")
    page = body.decode()
    assert status == 200 and '<table id="estimate"' in page
    assert re.search(r'<tr data-category="circle".*?</tr>', page, re.DOTALL)
    status, _, body = get(f"{server}/review/circle?queue=estimate")
    page = body.decode()
    assert status == 200 and 'id="review-config"' in page and "/static/review.js" in page
    config = json.loads(
        re.search(r'<script id="review-config" type="application/json">(.*?)</script>', page, re.DOTALL)[1]
    )
    assert config["category"] == "circle" and config["queue"] == "estimate" and len(config["cards"]) > 0
    assert get(f"{server}/review/no-such-category")[0] == 404
    status, _, body = get(f"{server}/static/review.js")
    assert status == 200 and b"requestId" in body
