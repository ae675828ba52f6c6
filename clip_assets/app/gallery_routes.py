"""The gallery and the near-duplicate groups, as the assets' pages show them, from DuckDB as it is now.

GET /gallery?matched=N&near=N&batch=B   per category its best matches and near misses (clip_assets.pages.gallery)
GET /duplicates?groups=N                the largest near-duplicate groups (the near_duplicates asset's)
"""

from __future__ import annotations

import logging

import duckdb
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from clip_assets.app.state import app_state, page
from clip_assets.app.templating import thumb_url
from clip_assets.errors import is_project_error
from clip_assets.pages.gallery import duplicate_groups, gallery_sections

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
    empty = {"title": f"clip-assets {active}", "sections": [], "groups": [], "thumbs": {}}
    if not app_state(request).layout.duckdb_path.is_file():
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


def duplicates(request: Request) -> Response:
    state = app_state(request)

    def read():
        groups = duplicate_groups(state.layout, whole_number(request, "groups", 200, 10_000))
        return {"groups": groups, "thumbs": {i.image_id: thumb_url(i.path) for g in groups for i in g}}

    return from_duckdb(
        request,
        "duplicates.html",
        "near-duplicates",
        "No near-duplicate groups yet: materialize near_duplicates first.",
        read,
    )


routes = [Route("/gallery", gallery, methods=["GET"]), Route("/duplicates", duplicates, methods=["GET"])]
