"""The schedules that find changed files: the re-scan (stat) and the content check (bytes).

The re-scan schedule: batches whose files changed since their manifest are listed, encoded and classified again.

Running by default on `CLIP_ASSETS_RESCAN_CRON` (hourly). The tick compares each registered batch's
files (stat only) with its last manifest (clip_assets.ingest.batch_discovery.changed_batches) and requests
runs for the changed ones only: an unchanged batch gets no run, so nothing downstream of it
re-materializes. With more batches than a tick can compare in TICK_BUDGET_S, each tick takes the
next slice (clip_assets.ingest.batch_discovery.rescan_slice), so a full pass spans several ticks. Changed
batches that are neighbours in the partition order share a run (up to BATCHES_PER_RUN), as the
discovery sensor's do: one model load per run, not per batch.
"""


import dagster as dg

from clip_assets.defs.ingest.jobs import batch_run_requests, classify_image_batch_job
from clip_assets.defs.partitions import image_batches
from clip_assets.defs.resources import ImageCollection
from clip_assets.ingest.batch_discovery import read_rescan_position, rescan_slice, write_rescan_position
from clip_assets.ingest.content_check import (
    content_check_slice,
    read_content_check_position,
    record_content_changes,
    write_content_check_position,
)

RESCAN_SCHEDULE = "rescan_image_batches"
CONTENT_CHECK_SCHEDULE = "content_check"
# Dagster gives a schedule tick 60 s by default (DAGSTER_SCHEDULE_GRPC_TIMEOUT_SECONDS): a tick compares
# batches for this long at most, and the next tick goes on from where it stopped.
TICK_BUDGET_S = 40.0


def build_rescan_schedule(cron: str) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=RESCAN_SCHEDULE,
        cron_schedule=cron,
        target=classify_image_batch_job,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Re-lists every batch; batches whose files changed are encoded and classified again.",
    )
    def rescan_image_batches(context: dg.ScheduleEvaluationContext, collection: ImageCollection):
        batches = list(context.instance.get_dynamic_partitions(image_batches.name))
        layout = collection.layout
        found = rescan_slice(collection.root, layout, batches, read_rescan_position(layout),
                             TICK_BUDGET_S, context.log.warning)
        write_rescan_position(layout, found.next_start)
        rest = (f" Checked {found.checked} of {len(batches)} batches in this tick's {TICK_BUDGET_S:.0f} s; "
                f"the next tick goes on from {found.next_start}." if found.next_start else "")
        if not found.changed:
            return dg.SkipReason(f"None of {found.checked} batches changed.{rest}")
        if rest:
            context.log.info(rest.strip())
        return batch_run_requests(batches, found.changed, run_key_prefix="rescan", tags={"clip_assets/trigger": "rescan"})

    return rescan_image_batches


def build_content_check_schedule(cron: str, budget_s: float) -> dg.ScheduleDefinition:
    """Stopped by default: reading every file again costs a full read of the collection per pass.
    Start it in the UI (Automation, `content_check`) or with `dagster schedule start content_check`."""

    @dg.schedule(
        name=CONTENT_CHECK_SCHEDULE,
        cron_schedule=cron,
        target=classify_image_batch_job,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Re-hashes files whose size and mtime did not change, CLIP_ASSETS_CONTENT_CHECK_BUDGET_S "
        "seconds a tick; batches with content replaced under an unchanged stat are encoded and classified again.",
    )
    def content_check(context: dg.ScheduleEvaluationContext, collection: ImageCollection):
        batches = list(context.instance.get_dynamic_partitions(image_batches.name))
        layout = collection.layout
        found = content_check_slice(collection.root, layout, batches,
                                    read_content_check_position(layout), budget_s, context.log.warning)
        record_content_changes(layout, found.changed)  # before the runs: the embedding step reads them
        write_content_check_position(layout, found.next_position)
        where = f"; the next tick goes on from {found.next_position[0]}" if found.next_position else "; a pass ended"
        said = f"Re-hashed {found.checked_files} files ({found.checked_bytes / 1e6:.1f} MB){where}."
        if not found.changed:
            return dg.SkipReason(f"{said} None changed under an unchanged stat.")
        changed = ", ".join(f"{b} ({len(ids)})" for b, ids in found.changed.items())
        context.log.warning(f"{said} Content changed under an unchanged size and mtime: {changed}")
        return batch_run_requests(batches, [b for b in batches if b in found.changed],
                                  run_key_prefix="content_check",
                                  tags={"clip_assets/trigger": "content_check"})

    return content_check
