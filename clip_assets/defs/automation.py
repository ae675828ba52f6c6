"""Prompt, label and caption edits re-run what depends on them: the prompt files, the labels file and
(where the deployment fine-tunes) the captions file are observed without a run, and what depends on
them re-materializes eagerly when the observed content hash changes (prompts: centroids, adapters,
classifications; labels: adapters, classifications; captions: clip_assets.defs.fine_tuning_assets).

Observing is not work, so it launches no run: the `prompt_files_observation` sensor hashes prompts/
every 30 s and records an observation (the hash as the data version) only when the hash differs
from the last one recorded. The `clip_assets_automation` sensor evaluates the assets' automation
conditions: `prompt_centroids` and `image_classifications` are eager, so a new data version of
`prompt_files` requests them, and `image_embeddings`, which does not depend on prompts, never.
Dagster's default automation sensor is STOPPED; this one runs by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import dagster as dg
from dagster._core.definitions.data_version import DATA_VERSION_IS_USER_PROVIDED_TAG, DATA_VERSION_TAG

from clip_assets.tuning.adapter_store import content_hash
from clip_assets.defs.resources import ImageCollection
from clip_assets.classification.prompts import prompt_files as list_prompt_files
from clip_assets.classification.prompts import prompt_version

PROMPT_FILES = dg.AssetKey("prompt_files")
LABELS_FILE = dg.AssetKey("labels_file")
CAPTIONS_FILE = dg.AssetKey("captions_file")
PROMPT_OBSERVATION_SENSOR = "prompt_files_observation"
LABELS_OBSERVATION_SENSOR = "labels_file_observation"
CAPTIONS_OBSERVATION_SENSOR = "captions_file_observation"
NO_LABELS = "no-labels"  # the labels file's data version while CLIP_ASSETS_LABELS is unset
NO_CAPTIONS = "no-captions"  # the captions file's while CLIP_ASSETS_FINE_TUNE_CAPTIONS is unset
MISSING_FILE = "missing"  # ... while it names no file
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


def file_observation(key: dg.AssetKey, path: Path | None, setting: str, unset_version: str) -> dg.AssetObservation:
    """An observation of a human-edited file now: its content hash as the data version, `unset_version`
    while `setting` names no file, MISSING_FILE while the file it names is not there."""
    if path is None:
        version, metadata = unset_version, {"path": f"unset ({setting})"}
    elif not Path(path).is_file():
        version, metadata = MISSING_FILE, {"path": str(path), "missing": True}
    else:
        version, metadata = content_hash(path), {"path": str(path)}
    return dg.AssetObservation(
        key, tags={DATA_VERSION_TAG: version, DATA_VERSION_IS_USER_PROVIDED_TAG: "true"}, metadata=metadata
    )


def labels_file_observation(labels_path: Path | None) -> dg.AssetObservation:
    """An observation of the labels file now: its content hash as the data version (or that there is none)."""
    return file_observation(LABELS_FILE, labels_path, "CLIP_ASSETS_LABELS", NO_LABELS)


def captions_file_observation(captions_path: Path) -> dg.AssetObservation:
    """An observation of the captions file fine_tuned_model tunes on: its content hash as the data version."""
    return file_observation(CAPTIONS_FILE, captions_path, "CLIP_ASSETS_FINE_TUNE_CAPTIONS", NO_CAPTIONS)


def last_observed_version(instance: dg.DagsterInstance, key: dg.AssetKey) -> str | None:
    records = instance.fetch_observations(key, limit=1).records
    return records[0].asset_observation.data_version if records else None


def changed(instance: dg.DagsterInstance, observation: dg.AssetObservation) -> dg.AssetObservation | None:
    """The observation when its data version differs from the last one recorded, else None."""
    return None if observation.data_version == last_observed_version(instance, observation.asset_key) else observation


def new_prompt_observation(instance: dg.DagsterInstance, prompts_dir: Path) -> dg.AssetObservation | None:
    """The observation to record, or None when the prompt files are as last observed."""
    return changed(instance, prompt_files_observation(prompts_dir))


def new_labels_observation(instance: dg.DagsterInstance, labels_path: Path | None) -> dg.AssetObservation | None:
    """The observation to record, or None when the labels file is as last observed."""
    return changed(instance, labels_file_observation(labels_path))


def new_captions_observation(instance: dg.DagsterInstance, captions_path: Path) -> dg.AssetObservation | None:
    """The observation to record, or None when the captions file is as last observed."""
    return changed(instance, captions_file_observation(captions_path))


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


def file_observation_sensor(name: str, what: str, resource_key: str,
                            new_observation: Callable[[dg.DagsterInstance, Any], dg.AssetObservation | None],
                            description: str) -> dg.SensorDefinition:
    """A sensor that records, without a run, `new_observation(instance, resource)` of a human-edited file
    when there is one (its hash changed)."""

    @dg.sensor(name=name, default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=CHECK_INTERVAL_S,
               description=description, required_resource_keys={resource_key})
    def observe_file(context: dg.SensorEvaluationContext):
        observation = new_observation(context.instance, getattr(context.resources, resource_key))
        if observation is None:
            return dg.SkipReason(f"The {what} is unchanged since it was last observed.")
        context.log.info(f"{what} changed: data version {observation.data_version}")
        return dg.SensorResult(asset_events=[observation])

    return observe_file


observe_labels_file = file_observation_sensor(
    LABELS_OBSERVATION_SENSOR, "labels file", "labelled_sample",
    lambda instance, labelled_sample: new_labels_observation(instance, labelled_sample.path),
    "Hashes the labels file (CLIP_ASSETS_LABELS) and records an observation of labels_file, without a run, when "
    "the hash changed: category_adapters and image_classifications then re-run.",
)
