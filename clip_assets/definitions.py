"""The code location: `dagster dev` (workspace.yaml) and `dagster definitions validate` load `defs`.

Each concern under clip_assets/defs/ builds its own `dg.Definitions`; they are merged here with the
resources, the automation sensor and the executor. The settings are read from the environment here
and only here (and in the CLI), then passed down.
"""

from __future__ import annotations

import dagster as dg

from clip_assets.config.settings import Settings
from clip_assets.defs import classification, embedding, ingest, pages, search, tuning
from clip_assets.defs.automation import automation_sensor
from clip_assets.defs.resources import pipeline_resources
from clip_assets.defs.tuning.fine_tuning import encoded_with_fine_tuned_model
from clip_assets.instance.dagster_internals import with_sensor_interval
from clip_assets.instance.executor import in_process_executor
from clip_assets.process import configure_process

# Steps run in the run's own process, which has imported torch and this code already. The steps of
# every job here form a chain (manifest -> embeddings -> classifications), so subprocesses per step
# would run nothing in parallel, while each costs a fresh import of torch and the code location
# (about 10 s on 2 cores, whether spawned or forked from a per-run forkserver). Pools (the GPU, the
# DuckDB writer) are claimed the same way in process; the wait for a slot frees the slots of runs whose
# process died, names the holder, sleeps and stops on Ctrl-C (clip_assets.instance.executor).
IN_PROCESS_EXECUTOR = in_process_executor


def build_definitions(settings: Settings, executor: dg.ExecutorDefinition | None = None) -> dg.Definitions:
    """The definitions of a deployment with these settings, which also apply to this process (the lock
    wait, extra model configs: clip_assets.process). `executor`: None runs steps in the run's process;
    definitions_k8s passes the k8s one."""
    configure_process(settings)
    defs = dg.Definitions.merge(
        ingest.definitions(settings),
        embedding.definitions(),
        classification.definitions(),
        tuning.definitions(settings),
        search.definitions(),
        pages.definitions(),
        dg.Definitions(executor=executor or IN_PROCESS_EXECUTOR, sensors=[automation_sensor],
                       resources=pipeline_resources(settings)),
    )
    if settings.sensor_interval_s is not None:
        defs = with_sensor_interval(defs, settings.sensor_interval_s)
    # With CLIP_ASSETS_USE_FINE_TUNED, the embeddings and centroids are encoded with fine_tuned_model.
    return encoded_with_fine_tuned_model(defs) if settings.use_fine_tuned else defs


SETTINGS = Settings.from_env()
defs = build_definitions(SETTINGS)
