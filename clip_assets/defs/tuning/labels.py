"""The labels file (CLIP_ASSETS_LABELS) as an observed source, and the sensor that observes it without a run."""

from pathlib import Path

import dagster as dg

from clip_assets.defs.asset_keys import LABELS_FILE
from clip_assets.defs.observation import file_observation, observation_sensor, observed_file_source, record_if_changed
from clip_assets.defs.resources import LabelledSample

LABELS_OBSERVATION_SENSOR = "labels_file_observation"
NO_LABELS = "no-labels"  # the labels file's data version while CLIP_ASSETS_LABELS is unset


def labels_file_observation(labels_path: Path | None) -> dg.AssetObservation:
    """An observation of the labels file now: its content hash as the data version (or that there is none)."""
    return file_observation(LABELS_FILE, labels_path, "CLIP_ASSETS_LABELS", NO_LABELS)


labels_file = observed_file_source(
    LABELS_FILE,
    "The labelled sample (CLIP_ASSETS_LABELS). Data version: a hash of its content, or 'no-labels' while "
    "the setting is unset. Observed by the labels_file_observation sensor without a run.",
    "csv", "labelled_sample", lambda labelled_sample: labels_file_observation(labelled_sample.path),
)


@observation_sensor(
    LABELS_OBSERVATION_SENSOR,
    "Hashes the labels file (CLIP_ASSETS_LABELS) and records an observation of labels_file, without a run, when "
    "the hash changed: category_adapters and image_classifications then re-run.",
)
def observe_labels_file(context: dg.SensorEvaluationContext, labelled_sample: LabelledSample):
    return record_if_changed(context, labels_file_observation(labelled_sample.path), "labels file")
