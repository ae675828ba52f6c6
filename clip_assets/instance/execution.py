"""Running the assets in-process against a real Dagster instance: used by the demo and the tests.

`dagster dev` and the daemon do the same through the UI, sensors and automation; these helpers are
for scripts that want a whole pipeline run recorded in an instance without a webserver.
"""

from __future__ import annotations

import logging

import dagster as dg

from clip_assets.defs.asset_keys import (
    BATCH_ASSETS,
    CATEGORY_ADAPTERS,
    COPY_THRESHOLD,
    FINE_TUNED_MODEL,
    IMAGE_SEARCH_INDEX,
    NEAR_DUPLICATES,
    PROMPT_CENTROIDS,
)
from clip_assets.defs.classification.prompts import PROMPT_OBSERVATION_SENSOR
from clip_assets.defs.partitions import image_batches
from clip_assets.defs.tuning.fine_tuning import CAPTIONS_OBSERVATION_SENSOR
from clip_assets.defs.tuning.labels import LABELS_OBSERVATION_SENSOR, REVIEW_LABELS_OBSERVATION_SENSOR
from clip_assets.instance.dagster_internals import partition_range_tags

# Keep the run log for the instance (the UI shows it) but only warnings on the console.
QUIET_CONSOLE = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}

def register_batches(instance: dg.DagsterInstance, batches: list[str]) -> list[str]:
    """Add batch folders as `image_batches` partitions; returns the ones that were new."""
    known = set(instance.get_dynamic_partitions(image_batches.name))
    new = [b for b in batches if b not in known]
    if new:
        instance.add_dynamic_partitions(image_batches.name, new)
    return new


def observe(defs: dg.Definitions, instance: dg.DagsterInstance, sensor_name: str) -> dg.AssetObservation | None:
    """What an observation sensor (the prompt files', the labels file's, the review labels', the captions file's) does on a
    tick, without a daemon: evaluate it and record its observation, without a run. Returns the
    observation, or None when the file is as last observed (or the deployment has no such sensor)."""
    sensor = next((s for s in defs.sensors or [] if s.name == sensor_name), None)
    if sensor is None:
        return None
    with dg.build_sensor_context(instance=instance, resources=defs.resources) as context:
        context.log.setLevel(logging.WARNING)  # as QUIET_CONSOLE does for runs: the daemon's tick log keeps the info
        result = sensor(context)
    events = result.asset_events if isinstance(result, dg.SensorResult) else []
    for event in events:
        instance.report_runless_asset_event(event)
    return events[0] if events else None


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
    tags = partition_range_tags(*partition_range) if partition_range else None
    return job.execute_in_process(
        instance=instance,
        asset_selection=keys,
        partition_key=partition_key,
        raise_on_error=raise_on_error,
        run_config=QUIET_CONSOLE,
        tags=tags,
    )


def materialize_everything(defs: dg.Definitions, instance: dg.DagsterInstance, batches: list[str]) -> None:
    """Observe prompts and labels, both kinds (and the captions, and fine-tune, where the deployment fine-tunes), build
    centroids and adapters, then manifest, embeddings, classifications and the index shard per batch,
    then the copy threshold and the near-duplicate groups."""
    register_batches(instance, batches)
    observe(defs, instance, PROMPT_OBSERVATION_SENSOR)
    observe(defs, instance, LABELS_OBSERVATION_SENSOR)
    observe(defs, instance, REVIEW_LABELS_OBSERVATION_SENSOR)
    if "captioned_pairs" in defs.resources:
        observe(defs, instance, CAPTIONS_OBSERVATION_SENSOR)
        materialize(defs, instance, [FINE_TUNED_MODEL])
    materialize(defs, instance, [PROMPT_CENTROIDS, CATEGORY_ADAPTERS])
    for batch in batches:
        materialize(defs, instance, BATCH_ASSETS, partition_key=batch)
        materialize(defs, instance, [IMAGE_SEARCH_INDEX], partition_key=batch)
    materialize(defs, instance, [COPY_THRESHOLD, NEAR_DUPLICATES])
