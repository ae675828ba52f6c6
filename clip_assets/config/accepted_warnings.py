"""The warnings this project has decided to live with, silenced in one place.

Dagster marks some of the APIs the pipeline relies on as beta or preview and warns about them in
every process that uses them: `dagster dev`'s terminal repeated the same blocks with every run and
step. Those warnings are for whoever chose the APIs (us, and the choice is made), not for the person
watching the pipeline. Everything else still warns.

Installed by the `clip_assets.defs` package before any definition is built (so in every process
that loads the code location: webserver, daemon, run and step workers), by the CLI, and for the
tests by conftest's pytest_configure.
"""

from __future__ import annotations

import warnings

import dagster as dg

# (category, message regex): Dagster's beta and preview notices, e.g. "Parameter `pool` of
# AssetsDefinition is currently in beta" or "Class `AutomationConditionSensorDefinition` is currently
# in beta, and may have breaking changes".
ACCEPTED = [
    (dg.BetaWarning, r".*is currently in beta"),
    (dg.PreviewWarning, r".*is currently in preview"),
    # classify_image_batch runs manifests and embeddings (multi_run(8)) with classifications
    # (single_run): Dagster takes the smaller, 8 batches per run, which is what the job wants.
    (UserWarning, r"Asset job classify_image_batch materializes assets with varying BackfillPolicies"),
]


def ignore() -> None:
    """Install the filters (idempotent: `warnings.filterwarnings` drops an identical filter first)."""
    for category, message in ACCEPTED:
        warnings.filterwarnings("ignore", message=message, category=category)


def pytest_filters() -> list[str]:
    """The same list as pytest `filterwarnings` lines (pytest resets the filters around each test)."""
    return [f"ignore:{message}:{category.__module__}.{category.__qualname__}" for category, message in ACCEPTED]
