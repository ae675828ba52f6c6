"""Dagster definitions, one folder per concern (ingest, embedding, classification, tuning, search, pages),
each building its own `dg.Definitions` that clip_assets.definitions merges; the modules beside them are
what the folders share (asset keys, partitions, resources, conventions, metadata, observation).

Asset bodies stay thin: the work lives in each concern's `steps` module (clip_assets.<concern>.steps),
plain functions the tests call without Dagster.

Loading the code location imports neither torch nor open_clip: the code server, the daemon and every
sensor tick hold only what Dagster needs (clip_assets_tests/defs/test_code_location_imports.py). A body
whose step needs the model imports that step when it runs; the modules the definitions import at load
keep torch behind TYPE_CHECKING or inside the functions that use it."""

from clip_assets.config import accepted_warnings

# Before any definition is built: the decorators warn about the beta and preview APIs they use, in
# every process that imports the code location (`dagster dev`'s webserver, daemon, runs and steps).
accepted_warnings.ignore()
