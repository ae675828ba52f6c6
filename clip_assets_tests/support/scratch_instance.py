"""A throwaway Dagster instance for tests and benchmarks that run the `dagster` CLI: sqlite storage
under its DAGSTER_HOME, no telemetry, and pools of one as in the repo's dagster.yaml; or the repo's
dagster.yaml itself, its storage moved under a temp DAGSTER_HOME."""

from pathlib import Path

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


def shipped_instance_yaml(home: Path) -> str:
    """The repo's own dagster.yaml (its queue, pools, run launcher and run monitoring), with the storage
    folders it keeps under `.dagster_home/` moved under `home`, so a test's instance is its own."""
    return (REPO_ROOT / "dagster.yaml").read_text().replace(".dagster_home", str(home / ".dagster_home"))
