"""The search page: a text box and an image upload, the results as thumbnails, each a link to the
images most like it. Each query is `clip_assets.search.query.search`, the command line's search.

    GET  /                   the form; with ?q=TEXT (or ?image=PATH, a stored image's path as search
                             prints it), &k=N, &batch=B, &category=C: the results
    POST /search             multipart form: an uploaded image (field `image`) or `q`, and the same options
    GET  /thumb?path=P&size=N  a JPEG of an image file under the image root (N: 192 or 384); nothing outside it
"""

from __future__ import annotations

import base64
import io
import logging
import time
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from clip_assets.app.files import SEARCH_THUMBNAIL_PX, THUMBNAIL_SIZES
from clip_assets.app.state import AppState, app_state, page
from clip_assets.app.templating import thumb_url
from clip_assets.app.uploads import UploadRefused, read_upload
from clip_assets.errors import is_project_error
from clip_assets.search.query import SearchHit, decode_query_image, search

log = logging.getLogger(__name__)

DEFAULT_K = 24
MAX_K = 500  # a page of thumbnails, not an export: the command line has no limit


class BadRequest(ValueError):
    """A request the page refuses, with the reason to show."""


@dataclass
class Query:
    """What a person asked for, from a URL or a form."""

    text: str | None = None
    image_path: str | None = None  # a stored image, relative to the image root
    upload: bytes | None = None
    upload_name: str = "the uploaded file"
    k: int = DEFAULT_K
    batch: str | None = None
    category: str | None = None

    @classmethod
    def from_fields(cls, fields, upload: bytes | None = None, upload_name: str | None = None) -> Query:
        raw_k = (fields.get("k") or "").strip() or str(DEFAULT_K)
        try:
            k = int(raw_k)
        except ValueError:
            raise BadRequest(f"k must be a whole number, got {raw_k!r}") from None
        if not 1 <= k <= MAX_K:
            raise BadRequest(f"k must be from 1 to {MAX_K}, got {k}")
        return cls(
            text=fields.get("q") if (fields.get("q") or "").strip() else None,
            image_path=fields.get("image") or None,
            upload=upload or None,
            upload_name=upload_name or "the uploaded file",
            k=k,
            batch=fields.get("batch") or None,
            category=fields.get("category") or None,
        )

    @property
    def empty(self) -> bool:
        return self.text is None and self.image_path is None and self.upload is None


def run_query(state: AppState, query: Query, damaged: list) -> tuple[list[SearchHit], str | None]:
    """The hits, and the query image's thumbnail URL (a stored image) or data URI (an upload); the
    damaged files left out of the search (the other batches were searched) go to `damaged`."""
    common = {
        "k": query.k,
        "batches": [query.batch] if query.batch else None,
        "category": query.category,
        "clip": state.clip,
        "damaged": damaged,
    }
    if query.upload is not None:
        image = decode_query_image(query.upload, query.upload_name)
        with state.search_lock:
            hits = search(state.settings, image=image, **common)
        return hits, data_uri_thumbnail(image)
    if query.image_path is not None:
        path = state.files.source(query.image_path)
        if path is None:
            raise BadRequest(f"No image file {query.image_path} under the image root.")
        if callable(path):  # an object in a store: its bytes, decoded as an upload's
            try:
                path = decode_query_image(path(), query.image_path)
            except OSError as exc:
                raise BadRequest(f"No image file {query.image_path} under the image root ({exc}).") from exc
        with state.search_lock:
            hits = search(state.settings, image=path, **common)
        return hits, thumb_url(query.image_path)
    with state.search_lock:  # one query at a time: the model and the scan use every core anyway
        return search(state.settings, text=query.text, **common), None


def results(request: Request, query: Query) -> Response:
    """The page for a query: the form, and the hits or the reason there are none (run in a worker thread)."""
    state = app_state(request)
    if query.empty:
        return search_page(request, query)
    started = time.perf_counter()
    damaged: list = []
    try:
        hits, picture = run_query(state, query, damaged)
    except BadRequest as exc:
        return search_page(request, query, error=str(exc), status=400)
    except Exception as exc:
        if not is_project_error(exc):  # a bug, not the query's fault
            log.exception("search failed")
            return search_page(request, query, error="The search failed; the server's log says why.", status=500)
        return search_page(request, query, error=str(exc), status=400)
    return search_page(
        request,
        query,
        hits=hits,
        query_picture=picture,
        seconds=time.perf_counter() - started,
        warnings=[str(exc) for exc in damaged],
    )


def search_page(
    request: Request,
    query: Query,
    status: int = 200,
    error: str | None = None,
    hits: list[SearchHit] | None = None,
    query_picture: str | None = None,
    seconds: float = 0.0,
    warnings: list[str] = (),
):
    state = app_state(request)
    return page(
        request,
        "search.html",
        "search",
        status=status,
        error=error,
        warnings=warnings,
        query=query,
        hits=hits,
        query_picture=query_picture,
        seconds=seconds,
        max_k=MAX_K,
        batches=state.batches(),
        categories=state.categories,
    )


def data_uri_thumbnail(image) -> str:
    """An uploaded image, small, inline: the upload is not stored anywhere."""
    small = image.copy()
    small.thumbnail((SEARCH_THUMBNAIL_PX, SEARCH_THUMBNAIL_PX))
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def home(request: Request) -> Response:
    try:
        query = Query.from_fields(request.query_params)
    except BadRequest as exc:
        return search_page(request, Query(), error=str(exc), status=400)
    return results(request, query)


async def upload_search(request: Request) -> Response:
    try:
        upload = await read_upload(request, "image")
        query = Query.from_fields(upload.fields, upload.data, upload.name)
    except UploadRefused as exc:
        if exc.status in (411, 413):  # the body was not read: the connection cannot carry another request
            return PlainTextResponse(f"{exc}\n", exc.status, headers={"Connection": "close"})
        return await run_in_threadpool(search_page, request, Query(), exc.status, str(exc))
    except BadRequest as exc:
        return await run_in_threadpool(search_page, request, Query(), 400, str(exc))
    if query.empty:
        return await run_in_threadpool(
            search_page, request, query, 400, "Choose an image file to upload, or type a text."
        )
    return await run_in_threadpool(results, request, query)


def thumbnail(request: Request) -> Response:
    try:
        size = int(request.query_params.get("size") or SEARCH_THUMBNAIL_PX)
    except ValueError:
        size = 0
    if size not in THUMBNAIL_SIZES:
        return PlainTextResponse(f"size must be one of {', '.join(map(str, THUMBNAIL_SIZES))}\n", 400)
    jpeg = app_state(request).files.thumbnail(request.query_params.get("path", ""), size)
    if jpeg is None:
        return PlainTextResponse("no such image under the image root\n", 404)
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


routes = [
    Route("/", home, methods=["GET"]),
    Route("/search", upload_search, methods=["POST"]),
    Route("/thumb", thumbnail, methods=["GET"]),
]
