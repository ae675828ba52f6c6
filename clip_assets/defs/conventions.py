"""What every asset of the code location shares: its owner, the concurrency pools, the DuckDB tags."""

OWNER = "team:clip-assets"
# Concurrency pools (limits in dagster.yaml): DuckDB has one writer; the GPU takes one encoder.
DUCKDB_WRITER_POOL = "duckdb_writer"
GPU_POOL = "gpu"
# What an asset does with the DuckDB file, as a tag the UI shows and filters on
# (`tag:clip_assets/duckdb=read-only`): readers and writers each wait for the other's lock.
DUCKDB_READER = {"clip_assets/duckdb": "read-only"}
DUCKDB_WRITER = {"clip_assets/duckdb": "read-write"}
