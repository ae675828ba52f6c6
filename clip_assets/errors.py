"""Which errors are the project's own: raised on purpose, with a message for the user, not a bug.

The command line prints such an error as one line and exits 1; the web app shows it on the page;
anything else keeps its traceback (clip_assets.defs.failures does the same for Dagster steps).
"""

from __future__ import annotations


def is_project_error(exc: BaseException) -> bool:
    """Raised on purpose by this project, with a message for the user (not a bug's traceback)."""
    return type(exc).__module__.split(".")[0] == "clip_assets"
