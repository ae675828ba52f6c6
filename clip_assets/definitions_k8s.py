"""The code location for Kubernetes: the same assets, each step run as its own Kubernetes job.

Use with the instance config in deploy/dagster.k8s.yaml (Postgres storage, K8sRunLauncher), the
settings in deploy/clip-assets-settings.yaml (images and outputs in buckets, the parquet warehouse) and
`uv sync --extra k8s`. The embedding step's pod asks for a GPU through its `dagster-k8s/config` op
tag (clip_assets.defs.k8s); the classification steps are bounded by the `duckdb_writer` pool, which the
instance enforces across pods. Step pods inherit the run launcher's env Secrets and volumes (the
emptyDir for CLIP_ASSETS_CACHE_DIR).
"""

from __future__ import annotations

from dagster_k8s import k8s_job_executor

from clip_assets.definitions import SETTINGS, build_definitions

# Steps of one run at once across the cluster; pools still bound the DuckDB writer and the GPU step.
STEP_EXECUTOR_CONFIG = {
    "max_concurrent": SETTINGS.k8s_max_concurrent_steps,
    # The step pods get the same settings as the run pod: the image root, data dir and model.
    "env_config_maps": ["clip-assets-settings"],
    "step_k8s_config": {
        "container_config": {"resources": {"requests": {"cpu": "1", "memory": "4Gi"}}},
    },
}

defs = build_definitions(SETTINGS, executor=k8s_job_executor.configured(STEP_EXECUTOR_CONFIG))
