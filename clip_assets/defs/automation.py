"""Declarative automation: observe the prompt files on a cron, re-run what depends on them eagerly.

Dagster's default automation sensor is STOPPED, and a selection without source assets never
observes `prompt_files`; this sensor covers every asset, sources included, and runs by default.
"""

import dagster as dg

automation_sensor = dg.AutomationConditionSensorDefinition(
    "clip_assets_automation",
    target=dg.AssetSelection.all(include_sources=True),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Observes prompts/ every minute; re-materializes centroids and classifications when it changes.",
)

OBSERVE_PROMPTS_JOB = "observe_prompt_files"

# Observing on demand (the UI's "Observe sources", scripts and tests) without waiting for the cron.
observe_prompt_files_job = dg.define_asset_job(
    OBSERVE_PROMPTS_JOB, selection=dg.AssetSelection.assets("prompt_files"), description="Observe prompts/ now."
)
