"""The re-scan schedule: batches whose files changed since their manifest are listed, encoded and classified again.

Running by default on `CLIP_ASSETS_RESCAN_CRON` (hourly). The tick compares each registered batch's
files (stat only) with its last manifest (clip_assets.batch_discovery.changed_batches) and requests
runs for the changed ones only: an unchanged batch gets no run, so nothing downstream of it
re-materializes. Changed batches that are neighbours in the partition order share a run (up to
BATCHES_PER_RUN), as the discovery sensor's are: one model load per run, not per batch.
"""

from pathlib import Path

import dagster as dg

from clip_assets.batch_discovery import changed_batches
from clip_assets.defs.jobs import batch_run_requests, classify_image_batch_job
from clip_assets.defs.partitions import image_batches
from clip_assets.defs.resources import ImageCollection

RESCAN_SCHEDULE = "rescan_image_batches"


def build_rescan_schedule(cron: str) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=RESCAN_SCHEDULE,
        cron_schedule=cron,
        target=classify_image_batch_job,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Re-lists every batch; batches whose files changed are encoded and classified again.",
    )
    def rescan_image_batches(context: dg.ScheduleEvaluationContext, collection: ImageCollection):
        batches = context.instance.get_dynamic_partitions(image_batches.name)
        changed = changed_batches(Path(collection.image_root), collection.layout, batches, context.log.warning)
        if not changed:
            return dg.SkipReason(f"None of {len(batches)} batches changed.")
        return batch_run_requests(batches, changed, run_key_prefix="rescan", tags={"clip_assets/trigger": "rescan"})

    return rescan_image_batches
