"""Review per category: one image at a time, yes / no / skip / undo, each click stored at once in the
labels store (clip_assets.tuning.review_labels), in one of two queues a person chooses.

    GET  /review                          the categories, each with its two queues, and the estimates table
    GET  /review/{category}?queue=Q       the review page (Q: estimate or improve); keyboard y / n / s / u
    GET  /review/{category}/estimate      the estimates table alone (the page refreshes it as labels come in)
    GET  /api/review/{category}/cards?queue=Q&n=N   the next N cards of the queue, as JSON
    POST /api/review/verdicts             JSON {request_id, path, category, verdict, queue[, batch]}: stored at once;
                                          the same request_id again stores nothing new and answers the same record
    POST /api/review/undo                 JSON {request_id, record_id}: the verdict taken back, by a new record
    GET  /api/review/estimates            the estimates as JSON

The queues and the estimates are the labels store's; this module shows them and stores the clicks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from clip_assets.app.files import REVIEW_THUMBNAIL_PX
from clip_assets.app.state import AppState, app_state, page, read_categories, templates
from clip_assets.app.templating import thumb_url
from clip_assets.app.uploads import UploadRefused, declared_length
from clip_assets.errors import is_project_error
from clip_assets.tuning import review_labels
from clip_assets.tuning.precision_estimate import CategoryEstimate, estimate_precision
from clip_assets.tuning.review_labels import ESTIMATE, IMPROVE, ReviewLabelsError
from clip_assets.tuning.review_queues import QueueItem, estimate_queue, improve_queue

log = logging.getLogger(__name__)

QUEUES = {
    ESTIMATE: "a uniform random sample of the category's images: its labels estimate precision and recall",
    IMPROVE: "the images whose decision is least certain: its labels teach calibration and the adapters the most",
}
CARDS_PER_FETCH = 12
MAX_CARDS = 100
MAX_JSON_BYTES = 16 * 1024
REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{8,100}$")


def store(state: AppState):
    return state.layout.review_labels_path


def categories(state: AppState) -> list[str]:
    """The categories as the prompt files define them now (DuckDB's prompt_categories), else those read at start."""
    return read_categories(state.settings) or state.categories


class NotFound(LookupError):
    pass


def category_of(request: Request) -> str:
    category = request.path_params["category"]
    known = categories(app_state(request))
    if category not in known:
        raise NotFound(f"No category {category!r}: the prompt files define {', '.join(known) or 'none yet'}.")
    return category


def queue_of(request: Request) -> str:
    queue = request.query_params.get("queue") or ESTIMATE
    if queue not in QUEUES:
        raise ValueError(f"queue must be one of {', '.join(QUEUES)}, got {queue!r}")
    return queue


# --- what the labels store says ---------------------------------------------------------------------


def next_cards(state: AppState, category: str, queue: str, n: int) -> list[dict]:
    """The next `n` images of `queue` for `category` not labelled there yet, as cards for the page."""
    pick = estimate_queue if queue == ESTIMATE else improve_queue
    return [
        {
            "path": item.path,
            "batch": item.batch,
            "thumb": thumb_url(item.path, REVIEW_THUMBNAIL_PX),
            "model": item.model,
            "prompt_version": item.prompt_version,
            # the estimate queue hides the pipeline's decision, so it cannot sway the answer
            "detail": "" if queue == ESTIMATE else card_detail(item),
        }
        for item in pick(state.layout, category, n)
    ]


def card_detail(item: QueueItem) -> str:
    """Why an image of the improve queue is uncertain, in words."""
    said = f"the pipeline says {'yes' if item.model_matched else 'no'} (score {item.score:.3f}, threshold {item.threshold:.3f})"
    if item.rule_matched != item.model_matched:
        said += "; the zero-shot rule and the adapter disagree"
    if item.decided_by == "person":
        said += f"; a person said {'yes' if item.matched else 'no'} before"
    return said


def estimates(state: AppState, category: str | None = None) -> list[CategoryEstimate]:
    """Per category, precision and recall from the estimate queue's labels with their 95% intervals."""
    return estimate_precision(state.layout, [category] if category else categories(state))


# --- pages ----------------------------------------------------------------------------------------------


def review_index(request: Request) -> Response:
    state = app_state(request)
    known = categories(state)
    error = None if known else "No categories yet: materialize prompt_centroids (or run the demo) first."
    rows, error = guarded(lambda: estimates(state), error)
    return page(
        request,
        "review_index.html",
        "review",
        200 if known else 404,
        error,
        categories=known,
        estimates=rows or [],
        store=store(state),
    )


def review_page(request: Request) -> Response:
    state = app_state(request)
    try:
        category, queue = category_of(request), queue_of(request)
    except NotFound as exc:
        return review_error(request, 404, str(exc))
    except ValueError as exc:
        return review_error(request, 400, str(exc))
    first, error = guarded(lambda: next_cards(state, category, queue, CARDS_PER_FETCH))
    rows, error = guarded(lambda: estimates(state, category), error)
    config = {"category": category, "queue": queue, "batch": CARDS_PER_FETCH, "cards": first or []}
    return page(
        request,
        "review.html",
        "review",
        200,
        error,
        category=category,
        queue=queue,
        queues=list(QUEUES.items()),
        queue_note=QUEUES[queue],
        estimates=rows or [],
        config=config,
        size=REVIEW_THUMBNAIL_PX,
    )


def estimate_fragment(request: Request) -> Response:
    state = app_state(request)
    try:
        category = category_of(request)
    except NotFound as exc:
        return HTMLResponse(str(exc), 404)
    rows, error = guarded(lambda: estimates(state, category))
    if error:
        return HTMLResponse(error, 503)
    macro = templates.env.get_template("_estimates.html").module.estimate_table
    return HTMLResponse(str(macro(rows)))


def review_error(request: Request, status: int, message: str) -> Response:
    state = app_state(request)
    return page(
        request,
        "review_index.html",
        "review",
        status,
        message,
        categories=categories(state),
        estimates=[],
        store=store(state),
    )


def guarded(read, error: str | None = None):
    """(what `read()` returns, None) or (None, the reason it could not, in words): a page still shows."""
    try:
        return read(), error
    except Exception as exc:
        if not is_project_error(exc):
            log.exception("reading the labels store failed")
            return None, error or "Reading the labels failed; the server's log says why."
        return None, error or str(exc)


# --- the JSON endpoints -------------------------------------------------------------------------------


def json_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)


def cards(request: Request) -> Response:
    state = app_state(request)
    try:
        category, queue = category_of(request), queue_of(request)
        n = int(request.query_params.get("n") or CARDS_PER_FETCH)
        if not 1 <= n <= MAX_CARDS:
            raise ValueError(f"n must be from 1 to {MAX_CARDS}, got {n}")
    except NotFound as exc:
        return json_error(404, str(exc))
    except ValueError as exc:
        return json_error(400, str(exc))
    found, error = guarded(lambda: next_cards(state, category, queue, n))
    return json_error(503, error) if error else JSONResponse({"cards": found})


async def json_body(request: Request) -> dict:
    declared_length(request, MAX_JSON_BYTES)  # refused before the body is read
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise ValueError("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not REQUEST_ID.match(request_id):
        raise ValueError(
            "request_id must be 8 to 100 letters, digits or _.:- (a new one per click, the same on a retry)"
        )
    return body


async def store_click(request: Request, write) -> Response:
    """Read the JSON body, then store what `write(state, body)` stores; its record as JSON."""
    try:
        body = await json_body(request)
    except UploadRefused as exc:
        return json_error(exc.status, str(exc))
    except ValueError as exc:
        return json_error(400, str(exc))
    try:
        record = await run_in_threadpool(write, app_state(request), body)
    except (ReviewLabelsError, ValueError, TypeError) as exc:
        return json_error(400, str(exc))
    return JSONResponse({"record": dataclasses.asdict(record)})


def write_verdict(state: AppState, body: dict):
    queue = body.get("queue")
    if queue not in QUEUES:
        raise ReviewLabelsError(f"queue must be one of {', '.join(QUEUES)}, got {queue!r}")
    return review_labels.record_verdict(
        store(state),
        body.get("path") or "",
        body.get("category") or "",
        body.get("verdict") or "",
        queue,
        request_id=body["request_id"],
        batch=body.get("batch") or None,
        # what the card was shown with (the classifications' model and prompt version), else the app's model
        model=str(body.get("model") or "")[:200] or state.clip.identity,
        prompt_version=str(body.get("prompt_version") or "")[:64] or None,
    )


def write_undo(state: AppState, body: dict):
    record_id = body.get("record_id")
    if not isinstance(record_id, int):
        raise ReviewLabelsError(f"record_id must be a whole number, got {record_id!r}")
    return review_labels.undo(store(state), record_id, request_id=body["request_id"])


async def verdict(request: Request) -> Response:
    return await store_click(request, write_verdict)


async def undo(request: Request) -> Response:
    return await store_click(request, write_undo)


def estimates_json(request: Request) -> Response:
    rows, error = guarded(lambda: estimates(app_state(request)))
    return json_error(503, error) if error else JSONResponse({"estimates": [r.as_row() for r in rows]})


routes = [
    Route("/review", review_index, methods=["GET"]),
    Route("/review/{category}", review_page, methods=["GET"]),
    Route("/review/{category}/estimate", estimate_fragment, methods=["GET"]),
    Route("/api/review/verdicts", verdict, methods=["POST"]),
    Route("/api/review/undo", undo, methods=["POST"]),
    Route("/api/review/estimates", estimates_json, methods=["GET"]),
    Route("/api/review/{category}/cards", cards, methods=["GET"]),
]
