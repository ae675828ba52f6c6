"""Running the assets in-process against a real Dagster instance: used by the demo and the tests.

`dagster dev` and the daemon do the same through the UI, sensors and automation; these helpers are
for scripts that want a whole pipeline run recorded in an instance without a webserver.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from clip_assets.defs.automation import new_captions_observation, new_labels_observation, new_prompt_observation
from clip_assets.defs.fine_tuning_assets import FINE_TUNED_MODEL
from clip_assets.defs.partitions import image_batches

# Keep the run log for the instance (the UI shows it) but only warnings on the console.
QUIET_CONSOLE = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}

# A throwaway instance for scripts and tests that run the `dagster` CLI: sqlite storage under its
# DAGSTER_HOME, no telemetry, and pools of one as in the repo's dagster.yaml.
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

BATCH_ASSETS = [dg.AssetKey("image_manifest"), dg.AssetKey("image_embeddings"), dg.AssetKey("image_classifications")]


def register_batches(instance: dg.DagsterInstance, batches: list[str]) -> list[str]:
    """Add batch folders as `image_batches` partitions; returns the ones that were new."""
    known = set(instance.get_dynamic_partitions(image_batches.name))
    new = [b for b in batches if b not in known]
    if new:
        instance.add_dynamic_partitions(image_batches.name, new)
    return new


def observe_prompt_files(defs: dg.Definitions, instance: dg.DagsterInstance) -> dg.AssetObservation | None:
    """What the prompt_files_observation sensor does on a tick: record an observation, without a run,
    when the prompt files changed since the last one. Returns it, or None when nothing changed."""
    observation = new_prompt_observation(instance, Path(defs.resources["collection"].prompts_dir))
    if observation is not None:
        instance.report_runless_asset_event(observation)
    return observation


def observe_labels_file(defs: dg.Definitions, instance: dg.DagsterInstance) -> dg.AssetObservation | None:
    """What the labels_file_observation sensor does on a tick (see observe_prompt_files)."""
    observation = new_labels_observation(instance, defs.resources["labelled_sample"].path)
    if observation is not None:
        instance.report_runless_asset_event(observation)
    return observation


def observe_captions_file(defs: dg.Definitions, instance: dg.DagsterInstance) -> dg.AssetObservation | None:
    """What the captions_file_observation sensor does on a tick (see observe_prompt_files); None also where
    the deployment has no fine-tuning."""
    captioned_pairs = defs.resources.get("captioned_pairs")
    observation = new_captions_observation(instance, captioned_pairs.path) if captioned_pairs else None
    if observation is not None:
        instance.report_runless_asset_event(observation)
    return observation


def materialize(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    keys: list[dg.AssetKey],
    partition_key: str | None = None,
    raise_on_error: bool = True,
    partition_range: tuple[str, str] | None = None,
) -> dg.ExecuteInProcessResult:
    """One run of `keys`: unpartitioned, one partition, or a range of partitions (first, last) as a
    backfill run covers them."""
    job = defs.resolve_implicit_global_asset_job_def()
    tags = (
        {ASSET_PARTITION_RANGE_START_TAG: partition_range[0], ASSET_PARTITION_RANGE_END_TAG: partition_range[1]}
        if partition_range else None
    )
    return job.execute_in_process(
        instance=instance,
        asset_selection=keys,
        partition_key=partition_key,
        raise_on_error=raise_on_error,
        run_config=QUIET_CONSOLE,
        tags=tags,
    )


def materialize_everything(defs: dg.Definitions, instance: dg.DagsterInstance, batches: list[str]) -> None:
    """Observe prompts and labels (and the captions, and fine-tune, where the deployment fine-tunes), build
    centroids and adapters, then manifest, embeddings, classifications and the index shard per batch,
    then the near-duplicate groups."""
    register_batches(instance, batches)
    observe_prompt_files(defs, instance)
    observe_labels_file(defs, instance)
    if "captioned_pairs" in defs.resources:
        observe_captions_file(defs, instance)
        materialize(defs, instance, [FINE_TUNED_MODEL])
    materialize(defs, instance, [dg.AssetKey("prompt_centroids"), dg.AssetKey("category_adapters")])
    for batch in batches:
        materialize(defs, instance, BATCH_ASSETS, partition_key=batch)
        materialize(defs, instance, [dg.AssetKey("image_search_index")], partition_key=batch)
    materialize(defs, instance, [dg.AssetKey("near_duplicates")])
