"""Prompt edits re-run what depends on them: the prompt files are observed without a run, and the
centroids and classifications re-materialize eagerly when the observed content hash changes.

Observing is not work, so it launches no run: the `prompt_files_observation` sensor hashes prompts/
every 30 s and records an observation (the hash as the data version) only when the hash differs
from the last one recorded. The `clip_assets_automation` sensor evaluates the assets' automation
conditions: `prompt_centroids` and `image_classifications` are eager, so a new data version of
`prompt_files` requests them, and `image_embeddings`, which does not depend on prompts, never.
Dagster's default automation sensor is STOPPED; this one runs by default.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from dagster._core.definitions.data_version import DATA_VERSION_IS_USER_PROVIDED_TAG, DATA_VERSION_TAG

from clip_assets.defs.resources import ImageCollection
from clip_assets.prompts import prompt_files as list_prompt_files
from clip_assets.prompts import prompt_version

PROMPT_FILES = dg.AssetKey("prompt_files")
PROMPT_OBSERVATION_SENSOR = "prompt_files_observation"
AUTOMATION_SENSOR = "clip_assets_automation"
CHECK_INTERVAL_S = 30

automation_sensor = dg.AutomationConditionSensorDefinition(
    AUTOMATION_SENSOR,
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=CHECK_INTERVAL_S,
    description="Re-materializes prompt_centroids and every batch of image_classifications when the observed "
    "prompt files change.",
)


def prompt_files_observation(prompts_dir: Path) -> dg.AssetObservation:
    """An observation of the prompt files now: their content hash as the data version, what they are."""
    return dg.AssetObservation(
        PROMPT_FILES,
        tags={DATA_VERSION_TAG: prompt_version(prompts_dir), DATA_VERSION_IS_USER_PROVIDED_TAG: "true"},
        metadata={"files": [p.name for p in list_prompt_files(prompts_dir)], "folder": str(prompts_dir)},
    )


def last_observed_prompt_version(instance: dg.DagsterInstance) -> str | None:
    records = instance.fetch_observations(PROMPT_FILES, limit=1).records
    return records[0].asset_observation.data_version if records else None


def new_prompt_observation(instance: dg.DagsterInstance, prompts_dir: Path) -> dg.AssetObservation | None:
    """The observation to record, or None when the prompt files are as last observed."""
    observation = prompt_files_observation(prompts_dir)
    return None if observation.data_version == last_observed_prompt_version(instance) else observation


@dg.sensor(
    name=PROMPT_OBSERVATION_SENSOR,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=CHECK_INTERVAL_S,
    description="Hashes prompts/ and records an observation of prompt_files, without a run, when the hash changed.",
)
def observe_prompt_files(context: dg.SensorEvaluationContext, collection: ImageCollection):
    prompts_dir = Path(collection.prompts_dir)
    if not prompts_dir.is_dir():
        return dg.SkipReason(f"Prompts folder {prompts_dir} does not exist (CLIP_ASSETS_PROMPTS_DIR).")
    observation = new_prompt_observation(context.instance, prompts_dir)
    if observation is None:
        return dg.SkipReason("The prompt files are unchanged since they were last observed.")
    context.log.info(f"prompt files changed: data version {observation.data_version}")
    return dg.SensorResult(asset_events=[observation])
