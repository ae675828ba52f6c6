"""The prompt files as an observed source: `prompt_files` and the sensor that observes it without a run."""

from pathlib import Path

import dagster as dg

from clip_assets.classification.prompts import prompt_files as list_prompt_files
from clip_assets.classification.prompts import prompt_version
from clip_assets.defs.asset_keys import PROMPT_FILES
from clip_assets.defs.observation import (
    observation,
    observation_sensor,
    observed,
    observed_files_spec,
    record_if_changed,
)
from clip_assets.defs.resources import ImageCollection

PROMPT_OBSERVATION_SENSOR = "prompt_files_observation"


def prompt_files_observation(prompts_dir: Path) -> dg.AssetObservation:
    """An observation of the prompt files now: their content hash as the data version, what they are."""
    return observation(PROMPT_FILES, prompt_version(prompts_dir),
                       {"files": [p.name for p in list_prompt_files(prompts_dir)], "folder": str(prompts_dir)})


def observe_prompts_folder(collection: ImageCollection) -> dg.AssetObservation | dg.SkipReason:
    prompts_dir = Path(collection.prompts_dir)
    if not prompts_dir.is_dir():
        return dg.SkipReason(f"Prompts folder {prompts_dir} does not exist (CLIP_ASSETS_PROMPTS_DIR).")
    return prompt_files_observation(prompts_dir)


@observation_sensor(
    PROMPT_OBSERVATION_SENSOR,
    "Hashes prompts/ and records an observation of prompt_files, without a run, when the hash changed.",
)
def observe_prompt_files(context: dg.SensorEvaluationContext, collection: ImageCollection):
    return record_if_changed(context, observe_prompts_folder(collection), "prompt files")


@dg.multi_observable_source_asset(
    specs=[observed_files_spec(
        PROMPT_FILES,
        "The human-edited prompt files (prompts/*.toml). Data version: a hash of their content. "
        "Observed by the prompt_files_observation sensor without a run.",
        "toml",
    )],
)
def prompt_files(collection: ImageCollection):
    """Observed in a run only when asked for (the UI's Observe button, the centroids' first build)."""
    yield observed(prompt_files_observation(Path(collection.prompts_dir)))
