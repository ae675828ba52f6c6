"""What the settings decide for the whole process, applied once at its edge.

The code location (clip_assets.definitions, whose `build_definitions` applies the settings it builds
from, the demo's among them) and the `clip-assets` command read the settings (`Settings.from_env()`)
and call `configure_process` with them; library code never reads the environment. Some settings are
process-wide rather than passed to each call: where the warehouse is (the DuckDB file or parquet
files: clip_assets.storage.warehouse), how long a DuckDB connection waits for another process's lock
(every reader and writer opens the file through clip_assets.storage.warehouse.connect), where a data
directory in an object store keeps its local working copy (clip_assets.storage.object_store) and where
extra open_clip architecture configs are (open_clip keeps its registry of architectures per process).
"""

from __future__ import annotations

from clip_assets.config.settings import Settings
from clip_assets.model.architectures import configure_model_config_dir  # torch-free: read when a model loads
from clip_assets.storage.object_store import configure_cache
from clip_assets.storage.warehouse import configure_lock_wait, configure_warehouse


def configure_process(settings: Settings) -> None:
    configure_lock_wait(settings.duckdb_wait_s)
    configure_warehouse(settings.warehouse)
    configure_model_config_dir(settings.model_config_dir)
    configure_cache(settings.cache_dir, settings.store_recheck_s)
