"""`clip-assets serve`: a small search page, for people who would rather look than read.

A text box and an image upload; the results as a grid of thumbnails, best first, each with its
score and path and a link to the images most like it. The model is loaded once when the server
starts; each query is `clip_assets.search.query.search`, the same search as the command line. The
server is the standard library's (a thread per request) and listens on loopback unless told
otherwise: it shows the collection to whoever can reach it.

Routes:
    GET  /                          the form; with ?q=TEXT (or ?image=PATH, a stored image's path as
                                    search prints it), &k=N, &batch=B, &category=C: the results
    POST /search                    multipart form: an uploaded image (field `image`) or `q`, and the same options
    GET  /thumb?path=PATH           a small JPEG of an image file under the image root; nothing outside it

The module stays whole (a little over 400 lines): it is one request handler, its form parsing and
the HTML it writes, which change together.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import html
import io
import ipaddress
import logging
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import Settings
from clip_assets.model.clip_model import import_open_clip, load_clip_model, model_identity
from clip_assets.model.fine_tuned_weights import configured_weights
from clip_assets.pages.gallery import LOAD_CHECK, write_thumbnail
from clip_assets.search.exact_search import check_query_model, embedding_files
from clip_assets.search.query import SearchHit, decode_query_image, search
from clip_assets.storage.warehouse import connect

log = logging.getLogger(__name__)

THUMBNAIL_PX = 192
DEFAULT_K = 24
MAX_K = 500  # a page of thumbnails, not an export: the command line has no limit
MAX_UPLOAD_BYTES = 32 * 1024 * 1024


class ServeError(RuntimeError):
    """The search page cannot start (the address is taken, or the model does not match the embeddings)."""


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
    def from_fields(cls, fields: dict[str, str], upload: bytes | None = None, upload_name: str | None = None) -> "Query":
        raw_k = fields.get("k", "").strip() or str(DEFAULT_K)
        try:
            k = int(raw_k)
        except ValueError:
            raise BadRequest(f"k must be a whole number, got {raw_k!r}") from None
        if not 1 <= k <= MAX_K:
            raise BadRequest(f"k must be from 1 to {MAX_K}, got {k}")
        return cls(
            text=fields.get("q") if fields.get("q", "").strip() else None,
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

    def options(self) -> dict[str, str]:
        return {"k": str(self.k), **({"batch": self.batch} if self.batch else {}),
                **({"category": self.category} if self.category else {})}


@dataclass
class SearchPage:
    """The page's state: settings, the loaded model, the categories to offer, the thumbnail cache."""

    settings: Settings
    clip: object  # clip_assets.model.clip_model.ClipModel, loaded once
    thumbs_dir: Path
    categories: list[str] = field(default_factory=list)
    _search_lock: threading.Lock = field(default_factory=threading.Lock)
    _thumb_lock: threading.Lock = field(default_factory=threading.Lock)

    # --- files ------------------------------------------------------------------------------------

    def file_under_root(self, relative: str) -> Path | None:
        """The file `relative` names inside the image root, or None: no `..`, absolute paths or
        symlinks leading out of it, no folders."""
        root = Path(self.settings.image_root).resolve()
        try:
            path = (root / relative).resolve()
            return path if path.is_relative_to(root) and path.is_file() else None
        except (OSError, ValueError, RuntimeError):  # a NUL byte; a loop of links (RuntimeError from resolve)
            return None

    def thumbnail(self, relative: str) -> bytes | None:
        """A small JPEG of an image under the root (cached by path, size and mtime), or None."""
        source = self.file_under_root(relative)
        if source is None:
            return None
        st = source.stat()
        key = hashlib.sha1(f"{source}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
        target = self.thumbs_dir / f"{key}.jpg"
        with self._thumb_lock:  # one writer: a thumbnail is never read half-written
            if not write_thumbnail(source, target, THUMBNAIL_PX):
                return None
        return target.read_bytes()

    # --- pages ------------------------------------------------------------------------------------

    def batches(self) -> list[str]:
        return [p.stem for p in embedding_files(DataLayout(self.settings.data_dir))]

    def results(self, query: Query) -> tuple[HTTPStatus, str]:
        """The page for a query: the form, and the hits or the reason there are none."""
        if query.empty:
            return HTTPStatus.OK, self.render(query)
        started = time.perf_counter()
        try:
            hits, query_picture = self.run(query)
        except BadRequest as exc:
            return HTTPStatus.BAD_REQUEST, self.render(query, error=str(exc))
        except Exception as exc:
            if type(exc).__module__.split(".")[0] != "clip_assets":  # a bug, not the query's fault
                log.exception("search failed")
                return HTTPStatus.INTERNAL_SERVER_ERROR, self.render(query, error="The search failed; the server's log says why.")
            return HTTPStatus.BAD_REQUEST, self.render(query, error=str(exc))
        return HTTPStatus.OK, self.render(query, hits, query_picture, time.perf_counter() - started)

    def run(self, query: Query) -> tuple[list[SearchHit], str | None]:
        """The hits, and the query image's thumbnail URL (a stored image) or data URI (an upload)."""
        common = dict(k=query.k, batches=[query.batch] if query.batch else None, category=query.category, clip=self.clip)
        if query.upload is not None:
            image = decode_query_image(query.upload, query.upload_name)
            with self._search_lock:
                hits = search(self.settings, image=image, **common)
            return hits, data_uri_thumbnail(image)
        if query.image_path is not None:
            path = self.file_under_root(query.image_path)
            if path is None:
                raise BadRequest(f"No image file {query.image_path} under the image root.")
            with self._search_lock:
                hits = search(self.settings, image=path, **common)
            return hits, thumb_url(query.image_path)
        with self._search_lock:  # one query at a time: the model and the scan use every core anyway
            return search(self.settings, text=query.text, **common), None

    def render(self, query: Query, hits: list[SearchHit] | None = None, query_picture: str | None = None,
               seconds: float | None = None, error: str | None = None) -> str:
        e = html.escape
        body = [f"<header><h1>clip-assets search</h1>{self.forms(query)}</header>"]
        if error:
            body.append(f'<p class="error" role="alert">{e(error)}</p>')
        if hits is not None:
            what = (f"“{e(query.text)}”" if query.text is not None
                    else e(query.image_path) if query.image_path is not None else e(query.upload_name))
            picture = f'<img class="query" src="{e(query_picture)}" alt="the query image">' if query_picture else ""
            filters = "".join(f", {name} {e(value)}" for name, value in (("batch", query.batch), ("category", query.category)) if value)
            body.append(
                f'<p class="summary">{picture}{len(hits)} images most like {what}{filters}, best first '
                f"(cosine similarity; {seconds:.2f} s).</p>"
            )
            cards = "".join(self.card(rank, hit) for rank, hit in enumerate(hits, 1))
            body.append(f'<main class="grid" data-hits="{len(hits)}">{cards or "<p>No matching images.</p>"}</main>')
        return (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{e(query.text or 'clip-assets search')}</title><style>{PAGE_STYLE}</style>"
            f"<script>{LOAD_CHECK}</script></head><body>{''.join(body)}</body></html>"
        )

    def card(self, rank: int, hit: SearchHit) -> str:
        e = html.escape
        more = "/?" + urlencode({"image": hit.path})
        return (
            f'<figure data-rank="{rank}" data-score="{hit.score:.6f}" data-path="{e(hit.path)}">'
            f'<a href="{e(more)}" title="images like this one"><img src="{e(thumb_url(hit.path))}" alt="{e(hit.path)}"></a>'
            f"<figcaption><b>{hit.score:.3f}</b> <small>#{rank}</small><br><small>{e(hit.path)}</small></figcaption></figure>"
        )

    def forms(self, query: Query) -> str:
        e = html.escape
        batch_options = "".join(
            f'<option value="{e(b)}"{" selected" if b == query.batch else ""}>{e(b)}</option>' for b in self.batches()
        )
        categories = "".join(f'<option value="{e(c)}">' for c in self.categories)
        options = (
            f'<label>k <input name="k" type="number" min="1" max="{MAX_K}" value="{query.k}"></label>'
            f'<label>batch <select name="batch"><option value="">all</option>{batch_options}</select></label>'
            f'<label>category <input name="category" list="categories" value="{e(query.category or "")}"'
            ' placeholder="any"></label>'
        )
        return (
            f'<datalist id="categories">{categories}</datalist>'
            '<form class="text" method="get" action="/">'
            f'<input name="q" type="search" size="40" placeholder="describe what to find, e.g. a red car"'
            f' value="{e(query.text or "")}" autofocus>{options}<button>Search</button></form>'
            '<form class="upload" method="post" action="/search" enctype="multipart/form-data">'
            f'<label>or images like <input name="image" type="file" accept="image/*" required></label>{options}'
            "<button>Upload and search</button></form>"
        )


def thumb_url(path: str) -> str:
    return "/thumb?path=" + quote(path, safe="/")


def data_uri_thumbnail(image) -> str:
    """An uploaded image, small, inline: the upload is not stored anywhere."""
    small = image.copy()
    small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


PAGE_STYLE = """
body { font-family: sans-serif; margin: 1.2em; color: #222; }
header h1 { font-size: 20px; margin: 0 0 0.5em; }
form { display: flex; flex-wrap: wrap; gap: 0.6em; align-items: center; margin: 0.4em 0; }
form input[type=number] { width: 4.5em; }
.error { background: #fde8e8; border: 1px solid #c33; padding: 0.6em; }
.summary { color: #444; display: flex; align-items: center; gap: 0.8em; }
.summary img.query { max-height: 64px; border: 2px solid #36c; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 10px; }
figure { margin: 0; text-align: center; font-size: 12px; }
figure img { width: 192px; height: 192px; object-fit: contain; background: #f3f3f3; border: 1px solid #ccc; }
small { color: #666; word-break: break-all; }
"""


def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], bytes | None, str | None]:
    """A multipart/form-data body: (text fields, the `image` file's bytes, its file name)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise BadRequest("expected a multipart/form-data upload")
    fields: dict[str, str] = {}
    upload, upload_name = None, None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "image" and part.get_filename() is not None:
            upload, upload_name = payload, part.get_filename()
        elif name:
            fields[name] = payload.decode("utf-8", errors="replace")
    return fields, upload, upload_name


class SearchPageHandler(BaseHTTPRequestHandler):
    """The routes; the page (settings, model, caches) is the server's `search_page`."""

    server_version = "clip-assets"

    def do_GET(self):
        page = self.server.search_page
        url = urlsplit(self.path)
        params = {name: values[-1] for name, values in parse_qs(url.query).items()}
        if url.path == "/":
            try:
                status, text = page.results(Query.from_fields(params))
            except BadRequest as exc:
                status, text = HTTPStatus.BAD_REQUEST, page.render(Query(), error=str(exc))
            self.send(status, text.encode(), "text/html; charset=utf-8")
        elif url.path == "/thumb":
            jpeg = page.thumbnail(params.get("path", ""))
            if jpeg is None:
                self.send(HTTPStatus.NOT_FOUND, b"no such image under the image root\n", "text/plain")
            else:
                self.send(HTTPStatus.OK, jpeg, "image/jpeg", cache=True)
        else:
            self.send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    def do_POST(self):
        page = self.server.search_page
        if urlsplit(self.path).path != "/search":
            self.send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.send(HTTPStatus.LENGTH_REQUIRED, b"Content-Length required\n", "text/plain")
            return
        if length > MAX_UPLOAD_BYTES:
            self.send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                      f"uploads are limited to {MAX_UPLOAD_BYTES // 2**20} MiB\n".encode(), "text/plain")
            self.close_connection = True
            return
        body = self.rfile.read(length)
        try:
            fields, upload, name = parse_multipart(self.headers.get("Content-Type", ""), body)
            query = Query.from_fields(fields, upload, name)
            status, text = page.results(query) if not query.empty else (
                HTTPStatus.BAD_REQUEST, page.render(query, error="Choose an image file to upload, or type a text."))
        except BadRequest as exc:
            status, text = HTTPStatus.BAD_REQUEST, page.render(Query(), error=str(exc))
        self.send(status, text.encode(), "text/html; charset=utf-8")

    def send(self, status: HTTPStatus, data: bytes, content_type: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # requests go to the log, not to stderr line by line
        log.info("%s %s", self.address_string(), format % args)


def read_categories(settings: Settings) -> list[str]:
    """The categories to suggest in the form, in the prompt files' order; none if DuckDB is busy or absent."""
    layout = DataLayout(settings.data_dir)
    if not layout.duckdb_path.is_file():
        return []
    try:
        with connect(layout.duckdb_path, read_only=True, wait_s=5) as con:
            return [r[0] for r in con.execute("SELECT category FROM prompt_categories ORDER BY position").fetchall()]
    except Exception as exc:  # a pipeline writing right now; the field still takes any name
        log.warning("no category suggestions (%s)", exc)
        return []


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a browser's open connections never keep the process alive


class _Server6(_Server):
    address_family = socket.AF_INET6


def start_server(settings: Settings, host: str, port: int, clip=None, thumbs_dir: Path | None = None) -> ThreadingHTTPServer:
    """A bound server with the model loaded (or `clip` reused); call serve_forever() on it.

    The address is taken first, so a port in use is said before the model loads. Thumbnails are
    cached in `thumbs_dir` (default: a new temporary folder, removed by `serve`)."""

    files = embedding_files(DataLayout(settings.data_dir))
    identity = clip.identity if clip is not None else model_identity(settings.model, configured_weights(settings))
    check_query_model(files, identity)  # a model that could never answer: refuse before loading it
    try:
        server = (_Server6 if ":" in host else _Server)((host, port), SearchPageHandler)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (choose another with --port)") from exc
    try:
        if clip is None:
            clip = load_clip_model(settings.model, configured_weights(settings), settings.device)
        thumbs_dir = thumbs_dir or Path(tempfile.mkdtemp(prefix="clip-assets-thumbs-"))
        server.search_page = SearchPage(settings, clip, thumbs_dir, read_categories(settings))
    except BaseException:
        server.server_close()
        raise
    return server


def serve(settings: Settings, host: str, port: int) -> None:
    """Run the search page until interrupted."""

    started = time.perf_counter()
    import_open_clip(settings.model, skip_unused_timm=True)  # this process loads one model
    server = start_server(settings, host, port)
    bound_host, bound_port = server.server_address[:2]
    print(f"clip-assets search page: http://{url_host(bound_host)}:{bound_port}/ "
          f"(ready in {time.perf_counter() - started:.1f} s; Ctrl-C stops it)", flush=True)
    if not is_loopback(host):
        print(f"note: listening on {host}, so anyone who can reach this machine can search and see the images",
              flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        shutil.rmtree(server.search_page.thumbs_dir, ignore_errors=True)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
