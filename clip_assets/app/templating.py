"""The app's Jinja2 templates (clip_assets/app/templates/), also used for the gallery pages the assets write."""

from __future__ import annotations

from functools import cache
from urllib.parse import quote, urlencode

import jinja2

# Counts images that finished loading with pixels, so a headless browser can tell a broken page.
LOAD_CHECK = """
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
});
"""


def thumb_url(path: str, size: int | None = None) -> str:
    """The app's URL of a thumbnail of a stored image (its path relative to the image root)."""
    return "/thumb?path=" + quote(path, safe="/") + (f"&size={size}" if size else "")


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("clip_assets.app", "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,  # a name missing from a page's context is a bug, not a blank
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(
        load_check=LOAD_CHECK, thumb_url=thumb_url, urlencode=urlencode, nav=False, active=None, error=None, warnings=()
    )  # a page written to a file has no navigation
    return env


def render(name: str, **context) -> str:
    """A template rendered to text (the pages written to files; the app renders through Starlette)."""
    return environment().get_template(name).render(**context)
