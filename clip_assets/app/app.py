"""`clip-assets serve`: the web app for people, on Starlette and uvicorn.

One navigation over four pages: search (text, image upload, search by example), the gallery, the
near-duplicate groups and review. The model is loaded once when the app starts; pages render Jinja2
templates (clip_assets/app/templates/). The app listens on loopback unless told otherwise: it shows
the collection to whoever can reach it. The only files it serves are its own static ones and
thumbnails of files under the image root.
"""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from clip_assets.app import gallery_routes, review_routes, search_routes
from clip_assets.app.files import ImageFiles
from clip_assets.app.state import AppState, read_categories
from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import Settings
from clip_assets.model.clip_model import model_identity
from clip_assets.model.fine_tuned_weights import configured_weights
from clip_assets.search.exact_search import check_query_model, embedding_files
from clip_assets.search.query import QueryModel

STATIC_DIR = Path(__file__).with_name("static")


class ServeError(RuntimeError):
    """The app cannot start (the address is taken, or the model does not match the embeddings)."""


class Headers:
    """Every response: not sniffed as another type, and not cached unless the route says so (thumbnails)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers.append((b"x-content-type-options", b"nosniff"))
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def build_app(state: AppState) -> Starlette:
    """The Starlette app over `state` (settings, loaded model, image files)."""
    app = Starlette(
        routes=[
            *search_routes.routes,
            *gallery_routes.routes,
            *review_routes.routes,
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ]
    )
    app.state.clip_assets = state
    app.add_middleware(Headers)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: one the system picks), so a port in use is said before the model loads."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (choose another with --port)") from exc
    return sock


def open_app(
    settings: Settings, host: str, port: int, clip=None, thumbs_dir: Path | None = None
) -> tuple[socket.socket, Starlette]:
    """The bound socket and the app with the model's text tower loaded (or `clip` reused): the image
    tower loads with the first image upload (clip_assets.search.query.QueryModel).

    A model that could never answer (the embeddings are another model's) is refused before anything
    loads, and the address is taken before the model loads. Thumbnails are cached in `thumbs_dir`
    (default: a new temporary folder)."""
    identity = clip.identity if clip is not None else model_identity(settings.model, configured_weights(settings))
    check_query_model(embedding_files(DataLayout(settings.data_dir)), identity)
    sock = bind(host, port)
    try:
        if clip is None:
            clip = QueryModel(settings, identity)
        thumbs_dir = thumbs_dir or Path(tempfile.mkdtemp(prefix="clip-assets-thumbs-"))
        state = AppState(settings, clip, ImageFiles(settings.image_root, thumbs_dir), read_categories(settings))
        return sock, build_app(state)
    except BaseException:
        sock.close()
        raise


def uvicorn_server(app: Starlette) -> uvicorn.Server:
    # log_config=None: uvicorn's loggers go through the process's logging (the CLI's one-line WARNING format)
    return uvicorn.Server(
        uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, timeout_graceful_shutdown=3)
    )


class RunningApp:
    """The app served by uvicorn in a thread of this process, on its bound socket (the tests, the demo)."""

    def __init__(self, sock: socket.socket, app: Starlette):
        self.sock, self.app = sock, app
        host, port = sock.getsockname()[:2]
        self.url = f"http://{url_host(host)}:{port}"  # still said once the app has stopped
        self.server = uvicorn_server(app)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True, name="clip-assets-app"
        )

    def start(self, timeout_s: float = 30) -> RunningApp:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ServeError("the app did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@contextlib.contextmanager
def running_app(
    settings: Settings, host: str = "127.0.0.1", port: int = 0, clip=None, thumbs_dir: Path | None = None
) -> Iterator[RunningApp]:
    """The app started in this process (a loopback port the system picks, by default) until the block ends."""
    sock, app = open_app(settings, host, port, clip, thumbs_dir)
    running = RunningApp(sock, app).start()
    try:
        yield running
    finally:
        running.stop()
        if thumbs_dir is None:
            shutil.rmtree(app.state.clip_assets.files.thumbs_dir, ignore_errors=True)


def serve(settings: Settings, host: str, port: int) -> None:
    """Run the app until interrupted."""
    started = time.perf_counter()
    sock, app = open_app(settings, host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    print(
        f"clip-assets: http://{url_host(bound_host)}:{bound_port}/ (search, gallery, near-duplicates, review; "
        f"ready in {time.perf_counter() - started:.1f} s; Ctrl-C stops it)",
        flush=True,
    )
    if not is_loopback(host):
        print(
            f"note: listening on {host}, so anyone who can reach this machine can search, see the images "
            "and record labels",
            flush=True,
        )
    try:
        uvicorn_server(app).run(sockets=[sock])
    finally:
        sock.close()
        shutil.rmtree(app.state.clip_assets.files.thumbs_dir, ignore_errors=True)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
