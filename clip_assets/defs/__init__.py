"""Dagster definitions: partitions, resources, assets and automation. The work lives in clip_assets.steps."""

from clip_assets.config import accepted_warnings

# Before any definition is built: the decorators warn about the beta and preview APIs they use, in
# every process that imports the code location (`dagster dev`'s webserver, daemon, runs and steps).
accepted_warnings.ignore()
