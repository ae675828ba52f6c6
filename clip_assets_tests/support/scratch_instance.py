"""A throwaway Dagster instance for tests and benchmarks that run the `dagster` CLI: sqlite storage
under its DAGSTER_HOME, no telemetry, and pools of one as in the repo's dagster.yaml."""

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
