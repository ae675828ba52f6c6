"""`classification_gallery`: a static HTML page of the classifications with thumbnails (clip_assets.pages)."""

import shlex
from pathlib import Path

import dagster as dg

from clip_assets.defs.asset_keys import IMAGE_CLASSIFICATIONS
from clip_assets.defs.conventions import DUCKDB_READER, OWNER
from clip_assets.defs.failures import user_errors_as_failures
from clip_assets.defs.resources import ImageCollection
from clip_assets.pages.gallery import write_gallery
from clip_assets.storage.atomic_files import folder_removed_on_failure

SERVE_PORT = 8765
SERVE_URL = f"http://127.0.0.1:{SERVE_PORT}/"


def serve_command(folder: Path) -> str:
    """One command that serves a gallery folder on SERVE_URL (Python's own static file server)."""
    return f"python3 -m http.server {SERVE_PORT} --bind 127.0.0.1 --directory {shlex.quote(str(folder))}"


@dg.asset(
    deps=[IMAGE_CLASSIFICATIONS],
    group_name="evaluation",
    kinds={"duckdb", "html"},
    tags=DUCKDB_READER,
    owners=[OWNER],
    code_version="1",
)
@user_errors_as_failures
def classification_gallery(context: dg.AssetExecutionContext, collection: ImageCollection) -> dg.MaterializeResult:
    """A static HTML page per run: per category, thumbnails of the best matched images and of the near
    misses, grouped by the condition they failed, with their scores. The materialization says how
    to open it: the file's URL, or one command that serves the folder on http://127.0.0.1:8765/."""
    out_dir = collection.layout.gallery_dir(context.run.run_id)
    with folder_removed_on_failure(out_dir):  # a full disk leaves no half page; earlier runs' pages stay
        page = write_gallery(collection.layout, collection.root, out_dir,  # a folder, or a StoreRoot
                             title=f"clip-assets gallery, run {context.run.run_id[:8]}")
    serve = serve_command(out_dir)
    return dg.MaterializeResult(
        metadata={
            "page": dg.MetadataValue.path(str(page)),
            "open": dg.MetadataValue.url(page.as_uri()),
            "serve": dg.MetadataValue.md(
                f"Browsers do not follow `file://` links from this page: copy the `open` URL into the address "
                f"bar, or serve the folder and open {SERVE_URL}:\n\n```bash\n{serve}\n```"
            ),
            "thumbnails": len(list((out_dir / "thumbs").glob("*.jpg"))),
        }
    )
