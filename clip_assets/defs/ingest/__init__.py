"""Batches in: the manifest of each batch folder, the sensor that finds new folders, the re-scan and content-check schedules."""

import dagster as dg

from clip_assets.config.settings import Settings
from clip_assets.defs.ingest.assets import image_manifest
from clip_assets.defs.ingest.jobs import classify_image_batch_job
from clip_assets.defs.ingest.schedules import build_content_check_schedule, build_rescan_schedule
from clip_assets.defs.ingest.sensors import image_batch_discovery, split_failed_batch_runs


def definitions(settings: Settings) -> dg.Definitions:
    return dg.Definitions(
        assets=[image_manifest],
        jobs=[classify_image_batch_job],
        sensors=[image_batch_discovery, split_failed_batch_runs],
        schedules=[
            build_rescan_schedule(settings.rescan_cron),
            build_content_check_schedule(settings.content_check_cron, settings.content_check_budget_s),
        ],
    )
