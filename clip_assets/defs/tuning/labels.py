"""The labels as observed sources, each with the sensor that observes it without a run: the labels
file (CLIP_ASSETS_LABELS) and the review pages' labels store (clip_assets.tuning.review_labels)."""

from pathlib import Path

import dagster as dg

from clip_assets.defs.asset_keys import LABELS_FILE, REVIEW_LABELS
from clip_assets.defs.observation import (
    file_observation,
    observation,
    observation_sensor,
    observed_file_source,
    record_if_changed,
)
from clip_assets.defs.resources import ImageCollection, LabelledSample
from clip_assets.tuning.review_labels import ReviewLabelsError, labels_version

LABELS_OBSERVATION_SENSOR = "labels_file_observation"
REVIEW_LABELS_OBSERVATION_SENSOR = "review_labels_observation"
NO_LABELS = "no-labels"  # the labels file's data version while CLIP_ASSETS_LABELS is unset
UNREADABLE = "unreadable"  # the store's data version while it cannot be read (the steps then fail, naming it)


def labels_file_observation(labels_path: Path | None) -> dg.AssetObservation:
    """An observation of the labels file now: its content hash as the data version (or that there is none)."""
    return file_observation(LABELS_FILE, labels_path, "CLIP_ASSETS_LABELS", NO_LABELS)


def review_labels_observation(store: Path) -> dg.AssetObservation:
    """An observation of the labels store now: a hash of its current yes/no verdicts as the data
    version (clip_assets.tuning.review_labels.labels_version)."""
    try:
        return observation(REVIEW_LABELS, labels_version(store), {"path": str(store)})
    except ReviewLabelsError as exc:
        return observation(REVIEW_LABELS, UNREADABLE, {"path": str(store), "error": str(exc)})


labels_file = observed_file_source(
    LABELS_FILE,
    "The labelled sample (CLIP_ASSETS_LABELS). Data version: a hash of its content, or 'no-labels' while "
    "the setting is unset. Observed by the labels_file_observation sensor without a run.",
    "csv", "labelled_sample", lambda labelled_sample: labels_file_observation(labelled_sample.path),
)

review_labels = observed_file_source(
    REVIEW_LABELS,
    "The verdicts people give in the review pages (`clip-assets serve`), one record per click in "
    "<data dir>/labels/review_labels.sqlite. Data version: a hash of the current yes/no verdicts, or "
    "'no-review-labels'. Observed by the review_labels_observation sensor without a run.",
    "sqlite", "collection", lambda collection: review_labels_observation(collection.layout.review_labels_path),
)


@observation_sensor(
    LABELS_OBSERVATION_SENSOR,
    "Hashes the labels file (CLIP_ASSETS_LABELS) and records an observation of labels_file, without a run, when "
    "the hash changed: category_adapters and image_classifications then re-run.",
)
def observe_labels_file(context: dg.SensorEvaluationContext, labelled_sample: LabelledSample):
    return record_if_changed(context, labels_file_observation(labelled_sample.path), "labels file")


@observation_sensor(
    REVIEW_LABELS_OBSERVATION_SENSOR,
    "Hashes the review pages' current yes/no verdicts and records an observation of review_labels, without a "
    "run, when the hash changed: category_adapters, image_classifications, image_evaluation and "
    "threshold_calibration then re-run.",
)
def observe_review_labels(context: dg.SensorEvaluationContext, collection: ImageCollection):
    return record_if_changed(context, review_labels_observation(collection.layout.review_labels_path), "review labels")
