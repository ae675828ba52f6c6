"""The batch-discovery sensor: new folders under the image root become partitions and get their runs.

Running by default, so `dagster dev` (or the daemon) classifies a new batch folder with nobody
clicking. Each tick costs one `stat` of the image root while nothing was added; see
clip_assets.ingest.batch_discovery for the cursor.

The runs need the prompt centroids first. On an instance where they were never built, the sensor
registers the new batches, requests the centroids run once, and keeps the batches pending in its
cursor; the tick after the centroids exist requests the batches' runs.
"""

from pathlib import Path

import dagster as dg

from clip_assets.defs.asset_keys import BATCH_ASSETS, PROMPT_CENTROIDS
from clip_assets.defs.classification.jobs import PROMPT_CENTROIDS_JOB, prompt_centroids_job
from clip_assets.defs.ingest.jobs import CLASSIFY_BATCH_JOB, batch_run_requests, classify_image_batch_job
from clip_assets.defs.partitions import image_batches
from clip_assets.defs.resources import ImageCollection
from clip_assets.ingest.batch_discovery import DiscoveryCursor, discover_new_batches
from clip_assets.instance.dagster_internals import WILL_RETRY_TAG, partition_range

BATCH_DISCOVERY_SENSOR = "image_batch_discovery"


@dg.sensor(
    name=BATCH_DISCOVERY_SENSOR,
    jobs=[classify_image_batch_job, prompt_centroids_job],
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Adds new batch folders under the image root to image_batches and classifies them.",
)
def image_batch_discovery(context: dg.SensorEvaluationContext, collection: ImageCollection):
    image_root = collection.root
    if isinstance(image_root, Path) and not image_root.is_dir():
        return dg.SkipReason(f"Image root {image_root} does not exist.")
    cursor = DiscoveryCursor.parse(context.cursor)
    found = discover_new_batches(
        image_root, lambda: context.instance.get_dynamic_partitions(image_batches.name), cursor
    )
    for batch, reason in found.refused.items():
        context.log.warning(f"Folder {batch!r} under {image_root} is not a batch: {reason}.")
    pending = found.cursor.pending + found.new
    if not pending:  # an idle tick says nothing (clip_assets.instance.daemon_logs), unless a folder was refused
        refused = " ".join(f"Not a batch: {b!r} ({r})." for b, r in found.refused.items())
        return dg.SensorResult(cursor=found.cursor.serialize(), skip_reason=refused or None)
    add = [image_batches.build_add_request(found.new)] if found.new else []
    if context.instance.get_latest_materialization_event(PROMPT_CENTROIDS) is None:
        # run_key: requested once; if it fails (a broken prompt file), the automation sensor builds
        # the centroids when the prompts are fixed, and the batches leave `pending` then.
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key="initial-prompt-centroids", job_name=PROMPT_CENTROIDS_JOB)],
            dynamic_partitions_requests=add,
            cursor=DiscoveryCursor(found.cursor.root_mtime_ns, pending).serialize(),
        )
    order = list(context.instance.get_dynamic_partitions(image_batches.name)) + found.new
    return dg.SensorResult(
        run_requests=batch_run_requests(order, pending, run_key_prefix="batches"),
        dynamic_partitions_requests=add,
        cursor=DiscoveryCursor(found.cursor.root_mtime_ns, []).serialize(),
    )


SPLIT_SENSOR = "split_failed_batch_runs"
SPLIT_FROM_TAG = "clip_assets/split_from"


def split_run_requests(run: dg.DagsterRun, instance: dg.DagsterInstance) -> list[dg.RunRequest]:
    """One run per batch of a failed run that covered several: the same assets, each batch alone.

    A failed multi-batch step has done its other batches' work (clip_assets.defs.batch_isolation),
    so their runs finish from what is on disk; the batch that failed fails again alone, and its
    partition shows why. Runs of one batch are not split, so nothing loops. A run that Dagster will
    retry (its worker died: run_retries in dagster.yaml) is not split either: its retry does the
    whole range again, and is split in turn if its steps fail.
    """
    if run.tags.get(WILL_RETRY_TAG) == "true":
        return []
    first, last = partition_range(run.tags) or (None, None)
    if first is None or first == last:
        return []
    selection = [k for k in BATCH_ASSETS if run.asset_selection is None or k in run.asset_selection]
    if not selection:
        return []
    order = list(instance.get_dynamic_partitions(image_batches.name))  # a range covers the keys between its ends
    if first not in order or last not in order:
        return []
    batches = order[order.index(first): order.index(last) + 1]
    return [
        dg.RunRequest(
            run_key=f"split:{run.run_id}:{batch}",
            job_name=CLASSIFY_BATCH_JOB,
            partition_key=batch,
            asset_selection=selection,
            tags={SPLIT_FROM_TAG: run.run_id},
        )
        for batch in batches
    ]


@dg.run_failure_sensor(
    name=SPLIT_SENSOR,
    request_job=classify_image_batch_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="When a run over several batches fails, runs each of its batches on its own, so one bad "
    "batch does not hold back the good ones.",
)
def split_failed_batch_runs(context: dg.RunFailureSensorContext):
    requests = split_run_requests(context.dagster_run, context.instance)
    if not requests:
        return dg.SkipReason(f"Run {context.dagster_run.run_id} covered one batch (or none): nothing to split.")
    context.log.info(f"run {context.dagster_run.run_id} failed over {len(requests)} batches: each runs alone now")
    return requests
