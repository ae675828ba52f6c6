"""What every page of the app shares: the settings, the loaded model, the image files, and how a page is rendered."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.templating import Jinja2Templates

from clip_assets.app.files import ImageFiles
from clip_assets.app.templating import environment
from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import Settings
from clip_assets.search.exact_search import embedding_files
from clip_assets.storage.warehouse import connect
from clip_assets.storage.warehouse import exists as warehouse_exists

if TYPE_CHECKING:
    from clip_assets.model.clip_model import ClipModel

log = logging.getLogger(__name__)

templates = Jinja2Templates(env=environment())


@dataclass
class AppState:
    """The app's state: settings, the model (loaded once), the files it may serve, the categories to offer."""

    settings: Settings
    clip: ClipModel
    files: ImageFiles
    categories: list[str] = field(default_factory=list)
    search_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.settings.data_dir)

    def batches(self) -> list[str]:
        return [p.stem for p in embedding_files(self.layout)]


def app_state(request: Request) -> AppState:
    return request.app.state.clip_assets


def page(request: Request, template: str, active: str, status: int = 200, error: str | None = None, **context):
    """A page of the app: `template` with the navigation (`active` marked) and the error, if any, on top."""
    return templates.TemplateResponse(
        request, template, {"nav": True, "active": active, "error": error, **context}, status_code=status
    )


def read_categories(settings: Settings) -> list[str]:
    """The categories, in the prompt files' order; none if DuckDB is busy or absent."""
    layout = DataLayout(settings.data_dir)
    if not warehouse_exists(layout.duckdb_path):
        return []
    try:
        with connect(layout.duckdb_path, read_only=True, wait_s=5) as con:
            return [r[0] for r in con.execute("SELECT category FROM prompt_categories ORDER BY position").fetchall()]
    except Exception as exc:  # a pipeline writing right now; the search field still takes any name
        log.warning("no category suggestions (%s)", exc)
        return []
