"""The gallery and the near-duplicate groups, as the assets' pages show them, from DuckDB as it is now.

GET /gallery?matched=N&near=N&batch=B   per category its best matches and near misses (clip_assets.pages.gallery)
GET /duplicates?groups=N&look_alikes=1  the largest near-duplicate groups of each tier (the near_duplicates
                                        asset's), look-alikes only when asked; a person chooses the file to keep
POST /duplicates/keep                   store a choice (form: group_id, tier, keep, members, request_id)
POST /duplicates/keep-suggested         store the suggested file of every group of a tier not chosen yet
POST /duplicates/undo                   take a choice back (form: record_id, request_id)
GET /duplicates/removals.csv?tiers=...  the files the choices leave to delete or move (default: exact, copy)
"""

from __future__ import annotations

import logging
import uuid
from urllib.parse import quote

import duckdb
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from clip_assets.app.state import app_state, page
from clip_assets.app.templating import thumb_url
from clip_assets.app.uploads import UploadRefused, declared_length
from clip_assets.errors import is_project_error
from clip_assets.pages.gallery import TIER_HEADINGS, duplicate_groups, gallery_sections
from clip_assets.search import duplicate_choices
from clip_assets.search.copy_threshold import CopyThreshold
from clip_assets.search.near_duplicates import LOOK_ALIKE, TIERS, images_without_hash
from clip_assets.storage.warehouse import connect, read_duplicate_groups
from clip_assets.storage.warehouse import exists as warehouse_exists

log = logging.getLogger(__name__)


def whole_number(request: Request, name: str, default: int, most: int) -> int:
    raw = request.query_params.get(name) or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
    if not 0 <= value <= most:
        raise ValueError(f"{name} must be from 0 to {most}, got {value}")
    return value


def from_duckdb(request: Request, template: str, active: str, missing: str, read) -> Response:
    """A page made of what `read()` reads from DuckDB, or the reason it cannot be read, in words."""
    empty = {"title": f"clip-assets {active}", "sections": [], "groups": [], "thumbs": {}, "tiers": {}, "summary": {},
             "choices": {}, "actions": False, "show_look_alikes": False, "look_alike_groups": 0, "request_ids": {}}
    if not warehouse_exists(app_state(request).layout.duckdb_path):
        return page(request, template, active, 404, missing, **empty)
    try:
        context = read()
    except ValueError as exc:  # an option out of range
        return page(request, template, active, 400, str(exc), **empty)
    except duckdb.CatalogException:  # the tables are not written yet
        return page(request, template, active, 404, missing, **empty)
    except Exception as exc:
        if is_project_error(exc):  # DuckDB held by a writer past the wait, say
            return page(request, template, active, 503, str(exc), **empty)
        log.exception("the %s page failed", active)
        return page(request, template, active, 500, "Reading DuckDB failed; the server's log says why.", **empty)
    return page(request, template, active, **{**empty, **context})


def gallery(request: Request) -> Response:
    state = app_state(request)

    def read():
        matched = whole_number(request, "matched", 12, 200)
        near = whole_number(request, "near", 6, 200)
        batch = request.query_params.get("batch") or None
        sections = gallery_sections(state.layout, matched, near, batch)
        images = [i for s in sections for g in s.groups for i in g.images]
        return {"sections": sections, "thumbs": {i.image_id: thumb_url(i.path) for i in images}}

    return from_duckdb(
        request,
        "gallery.html",
        "gallery",
        "No classifications yet: materialize image_classifications (or run the demo) first.",
        read,
    )


MAX_FORM_BYTES = 1_000_000


class RequestIds(dict):
    """A new request id for every button of a page (a double click or a resent form stores one choice)."""

    def __missing__(self, key: str) -> str:
        self[key] = uuid.uuid4().hex
        return self[key]


def duplicates_summary(state) -> dict:
    """The thresholds the groups were formed with, for the top of the page."""
    layout = state.layout
    with connect(layout.duckdb_path, read_only=True) as con:
        row = con.execute("SELECT any_value(threshold) FILTER (WHERE tier = 'copy'), "
                          "any_value(threshold) FILTER (WHERE tier = 'look-alike') FROM duplicate_groups").fetchone()
    settings = state.settings
    learnt = CopyThreshold.load(layout.copy_threshold_path)
    by_hand = settings.copy_threshold is not None
    copy_t = settings.copy_threshold if by_hand else (row[0] if row[0] is not None else
                                                      (learnt.threshold if learnt and learnt.threshold else None))
    if copy_t is None:
        return {}
    return {
        "copy_threshold": copy_t,
        "copy_threshold_source": "set by hand" if by_hand else (f"learnt for {learnt.model}" if learnt else "learnt"),
        "heldout_precision": None if by_hand or learnt is None else learnt.heldout_precision,
        "heldout_recall": None if by_hand or learnt is None else learnt.heldout_recall,
        "hash_distance": settings.copy_hash_distance,
        "look_alike": settings.duplicate_threshold,
        **dict(zip(("without_hash", "without_hash_batches"), images_without_hash(layout, state.batches()))),
    }


def duplicates(request: Request) -> Response:
    state = app_state(request)
    show_look_alikes = request.query_params.get("look_alikes") in ("1", "true", "yes")

    def read():
        n = whole_number(request, "groups", 200, 10_000)
        tiers = TIERS if show_look_alikes else tuple(t for t in TIERS if t != LOOK_ALIKE)
        groups = duplicate_groups(state.layout, n, tiers)
        look_alike_groups = 0
        if not show_look_alikes:
            with connect(state.layout.duckdb_path, read_only=True) as con:
                look_alike_groups = con.execute(
                    "SELECT count(*) FROM near_duplicate_groups WHERE tier = ?", [LOOK_ALIKE]).fetchone()[0]
        return {
            "groups": groups,
            "thumbs": {i.image_id: thumb_url(i.path) for g in groups for i in g.images},
            "tiers": TIER_HEADINGS,
            "summary": duplicates_summary(state),
            "choices": duplicate_choices.current_choices(state.layout.duplicate_choices_path),
            "actions": True,
            "show_look_alikes": show_look_alikes,
            "look_alike_groups": look_alike_groups,
            "request_ids": RequestIds(),
        }

    return from_duckdb(
        request,
        "duplicates.html",
        "near-duplicates",
        "No near-duplicate groups yet: materialize near_duplicates first.",
        read,
    )


async def form_of(request: Request) -> dict:
    """The posted form's fields (lists where a field repeats), its size checked before it is read."""
    declared_length(request, MAX_FORM_BYTES)
    form = await request.form()
    fields = {key: form.getlist(key) for key in form.keys()}
    return {k: (v if k == "members" else v[0]) for k, v in fields.items()}


async def store_form(request: Request, write) -> Response:
    """Store what `write(state, form)` stores, then back to the page (at the group, where there is one);
    a choice that cannot be stored shows the page with the reason, status 400."""
    try:
        form = await form_of(request)
        anchor = await run_in_threadpool(write, app_state(request), form)
    except UploadRefused as exc:
        return PlainTextResponse(str(exc), exc.status)
    except (duplicate_choices.DuplicateChoiceError, ValueError, KeyError) as exc:
        message = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        return page(request, "duplicates.html", "near-duplicates", 400, message, title="clip-assets near-duplicates",
                    groups=[], thumbs={}, tiers={}, summary={}, choices={}, actions=False, show_look_alikes=False,
                    look_alike_groups=0, request_ids=RequestIds())
    back = "/duplicates" + ("?look_alikes=1" if form.get("look_alikes") else "") + (f"#{quote(anchor)}" if anchor else "")
    return RedirectResponse(back, status_code=303)


def write_keep(state, form: dict) -> str:
    record = duplicate_choices.record_choice(state.layout.duplicate_choices_path, form["group_id"], form["tier"],
                                             form["keep"], form.get("members") or [], request_id=form.get("request_id"))
    return f"g-{record.group_id}"


def write_keep_suggested(state, form: dict) -> str:
    tier = form["tier"]
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
    store = state.layout.duplicate_choices_path
    chosen = duplicate_choices.current_choices(store)
    groups = duplicate_groups(state.layout, 10_000, (tier,))
    duplicate_choices.record_choices(store, [
        {"group_id": g.group_id, "tier": tier, "keep": g.suggested, "members": [i.path for i in g.images],
         "request_id": f"{form.get('request_id') or uuid.uuid4().hex}-{k}"}
        for k, g in enumerate(groups) if g.group_id not in chosen
    ])
    return f"tier-{tier}"


def write_undo(state, form: dict) -> str:
    try:
        record_id = int(form["record_id"])
    except ValueError:
        raise ValueError(f"record_id must be a whole number, got {form['record_id']!r}") from None
    record = duplicate_choices.undo(state.layout.duplicate_choices_path, record_id, request_id=form.get("request_id"))
    return f"g-{record.group_id}"


async def keep(request: Request) -> Response:
    return await store_form(request, write_keep)


async def keep_suggested(request: Request) -> Response:
    return await store_form(request, write_keep_suggested)


async def undo(request: Request) -> Response:
    return await store_form(request, write_undo)


def removals(request: Request) -> Response:
    """The files to delete or move, as CSV (a download)."""
    state = app_state(request)
    try:
        tiers = duplicate_choices.removal_tiers(request.query_params.get("tiers"))
    except ValueError as exc:
        return PlainTextResponse(str(exc), 400)
    if not warehouse_exists(state.layout.duckdb_path):
        return PlainTextResponse("No near-duplicate groups yet: materialize near_duplicates first.", 404)
    try:
        rows = read_duplicate_groups(state.layout.duckdb_path, 10**9, tiers)
        found = duplicate_choices.files_to_remove(state.layout.duplicate_choices_path, rows, tiers)
    except duckdb.CatalogException:
        return PlainTextResponse("No near-duplicate groups yet: materialize near_duplicates first.", 404)
    except Exception as exc:
        if not is_project_error(exc):
            raise
        return PlainTextResponse(str(exc), 503)
    return PlainTextResponse(duplicate_choices.removals_csv(found), media_type="text/csv", headers={
        "Content-Disposition": 'attachment; filename="duplicate-files-to-remove.csv"'})


routes = [
    Route("/gallery", gallery, methods=["GET"]),
    Route("/duplicates", duplicates, methods=["GET"]),
    Route("/duplicates/keep", keep, methods=["POST"]),
    Route("/duplicates/keep-suggested", keep_suggested, methods=["POST"]),
    Route("/duplicates/undo", undo, methods=["POST"]),
    Route("/duplicates/removals.csv", removals, methods=["GET"]),
]
