"""Running the assets in-process against a real Dagster instance: used by the demo and the tests.

`dagster dev` and the daemon do the same through the UI, sensors and automation; these helpers are
for scripts that want a whole pipeline run recorded in an instance without a webserver.
"""

from __future__ import annotations

import dagster as dg

from clip_assets.defs.automation import OBSERVE_PROMPTS_JOB
from clip_assets.defs.partitions import image_batches

# Keep the run log for the instance (the UI shows it) but only warnings on the console.
QUIET_CONSOLE = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}

BATCH_ASSETS = [dg.AssetKey("image_manifest"), dg.AssetKey("image_embeddings"), dg.AssetKey("image_classifications")]


def register_batches(instance: dg.DagsterInstance, batches: list[str]) -> list[str]:
    """Add batch folders as `image_batches` partitions; returns the ones that were new."""
    known = set(instance.get_dynamic_partitions(image_batches.name))
    new = [b for b in batches if b not in known]
    if new:
        instance.add_dynamic_partitions(image_batches.name, new)
    return new


def observe_prompt_files(defs: dg.Definitions, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def(OBSERVE_PROMPTS_JOB).execute_in_process(instance=instance, run_config=QUIET_CONSOLE)


def materialize(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    keys: list[dg.AssetKey],
    partition_key: str | None = None,
    raise_on_error: bool = True,
) -> dg.ExecuteInProcessResult:
    job = defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        instance=instance,
        asset_selection=keys,
        partition_key=partition_key,
        raise_on_error=raise_on_error,
        run_config=QUIET_CONSOLE,
    )


def materialize_everything(defs: dg.Definitions, instance: dg.DagsterInstance, batches: list[str]) -> None:
    """Observe prompts, build centroids, then manifest, embeddings and classifications per batch."""
    register_batches(instance, batches)
    observe_prompt_files(defs, instance)
    materialize(defs, instance, [dg.AssetKey("prompt_centroids")])
    for batch in batches:
        materialize(defs, instance, BATCH_ASSETS, partition_key=batch)
