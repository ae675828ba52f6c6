"""A throwaway Dagster instance for tests and benchmarks that run the `dagster` CLI: sqlite storage
under its DAGSTER_HOME, no telemetry, and pools of one as in the repo's dagster.yaml; or the repo's
dagster.yaml itself, its storage moved under a temp DAGSTER_HOME or into a Postgres database."""

from pathlib import Path

import yaml

from clip_assets.config.settings import REPO_ROOT

SCRATCH_INSTANCE_YAML = """\
storage:
  sqlite:
    base_dir: {home}/storage
telemetry:
  enabled: false
concurrency:
  pools:
    granularity: op
    default_limit: 1
"""


# The shipped dagster.yaml's storage: SQLite files under .dagster_home/.
SHIPPED_STORAGE = "storage:\n  sqlite:\n    base_dir: .dagster_home/storage\n"


def shipped_instance_yaml(home: Path, storage: dict | None = None) -> str:
    """The repo's own dagster.yaml (its queue, pools, run launcher and run monitoring), with the storage
    folders it keeps under `.dagster_home/` moved under `home`, so a test's instance is its own; with
    `storage` (the conftest's `instance_storage`: a Postgres database), its runs and event logs go there
    instead of SQLite files."""
    shipped = (REPO_ROOT / "dagster.yaml").read_text()
    if storage is not None:
        assert SHIPPED_STORAGE in shipped, "dagster.yaml's storage block changed: update SHIPPED_STORAGE"
        shipped = shipped.replace(SHIPPED_STORAGE, yaml.safe_dump({"storage": storage}, default_flow_style=False))
    return shipped.replace(".dagster_home", str(home / ".dagster_home"))
