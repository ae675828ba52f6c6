"""The review pages' labels inside the lineage: observed without a run, they make the tuning assets and the
classifications stale, and the automation re-runs them (never the embeddings); on a real Dagster instance."""

import datetime

import dagster as dg
import pytest

from clip_assets.config.layout import DataLayout
from clip_assets.definitions import build_definitions
from clip_assets.defs.asset_keys import (
    BATCH_ASSETS,
    CATEGORY_ADAPTERS,
    IMAGE_CLASSIFICATIONS,
    IMAGE_EMBEDDINGS,
    IMAGE_EVALUATION,
    PROMPT_CENTROIDS,
    REVIEW_LABELS,
    THRESHOLD_CALIBRATION,
)
from clip_assets.defs.classification.prompts import PROMPT_OBSERVATION_SENSOR
from clip_assets.defs.tuning.labels import LABELS_OBSERVATION_SENSOR, REVIEW_LABELS_OBSERVATION_SENSOR
from clip_assets.demo.shapes import LABELS_FILE, read_labels
from clip_assets.instance.execution import materialize, materialize_everything, observe
from clip_assets.storage.warehouse import connect
from clip_assets.tuning.precision_estimate import ROW_COLUMNS
from clip_assets.tuning.review_labels import NO_REVIEW_LABELS, labels_version, record_verdict
from clip_assets_tests.support.dagster_ticks import stale_status

BATCHES = ["batch-001", "batch-002"]
WHOLE = [CATEGORY_ADAPTERS, IMAGE_EVALUATION, THRESHOLD_CALIBRATION]  # unpartitioned, in dependency order
WATCHED = [*WHOLE, PROMPT_CENTROIDS, *BATCH_ASSETS]


def latest(instance, key):
    return instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=1).records[0]


def count(instance, key, partition=None):
    return len(instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1000).records)


def run_requested(defs, instance, result):
    """What the daemon would launch: the adapters first, the batches' classifications in one range run,
    then evaluation and calibration."""
    if result.get_num_requested(CATEGORY_ADAPTERS):
        materialize(defs, instance, [CATEGORY_ADAPTERS])
    for key in BATCH_ASSETS:
        partitions = sorted(result.get_requested_partitions(key))
        if partitions:
            materialize(defs, instance, [key], partition_range=(partitions[0], partitions[-1]))
    later = [key for key in WHOLE[1:] if result.get_num_requested(key)]
    if later:
        materialize(defs, instance, later)


def ticks_until_settled(defs, instance, result, now):
    """Each tick: the observation sensors, then the automation sensor, then the runs it asked for."""
    requested, quiet = set(), 0
    for tick in range(2, 16):
        for sensor in (PROMPT_OBSERVATION_SENSOR, LABELS_OBSERVATION_SENSOR, REVIEW_LABELS_OBSERVATION_SENSOR):
            observe(defs, instance, sensor)
        result = dg.evaluate_automation_conditions(
            defs, instance, cursor=result.cursor, evaluation_time=now + datetime.timedelta(minutes=tick))
        this_tick = {key for key in WATCHED if result.get_num_requested(key)}
        requested |= this_tick
        run_requested(defs, instance, result)
        quiet = 0 if this_tick else quiet + 1
        if quiet == 3:
            return requested, result
    pytest.fail(f"automation did not settle; requested so far: {requested}")


def test_review_labels_are_observed_without_a_run_and_re_run_tuning_and_classifications_not_embeddings(
        settings, instance, collection):
    defs = build_definitions(settings)
    materialize_everything(defs, instance, BATCHES)
    materialize(defs, instance, WHOLE[1:])  # no labels yet: both succeed, saying how to give some
    assert "clip-assets serve" in latest(instance, IMAGE_EVALUATION).asset_materialization.metadata["no_labels"].value
    now = datetime.datetime.now(datetime.timezone.utc)
    _, result = ticks_until_settled(defs, instance, dg.evaluate_automation_conditions(defs, instance, evaluation_time=now), now)
    assert instance.fetch_observations(REVIEW_LABELS, limit=1).records[0].asset_observation.data_version == NO_REVIEW_LABELS
    before = {key: count(instance, key) for key in [*WHOLE, PROMPT_CENTROIDS]}
    before |= {(key, b): count(instance, key, b) for key in (IMAGE_EMBEDDINGS, IMAGE_CLASSIFICATIONS) for b in BATCHES}
    assert stale_status(defs, instance, CATEGORY_ADAPTERS) == "FRESH"

    # a person reviews 'circle': twelve verdicts from the ground truth, in both queues
    layout = DataLayout(settings.data_dir)
    truth = read_labels(collection / LABELS_FILE)
    for i, (path, labels) in enumerate(sorted(truth.items())[:12]):
        record_verdict(layout.review_labels_path, path, "circle", "yes" if "circle" in labels else "no",
                       "estimate" if i % 2 else "improve", request_id=f"click-{i}")
    observed = observe(defs, instance, REVIEW_LABELS_OBSERVATION_SENSOR)
    assert observed.data_version == labels_version(layout.review_labels_path) != NO_REVIEW_LABELS
    record = instance.fetch_observations(REVIEW_LABELS, limit=1).records[0]
    assert record.run_id == ""  # observed without a run
    assert observe(defs, instance, REVIEW_LABELS_OBSERVATION_SENSOR) is None  # unchanged: nothing recorded again
    for key in WHOLE:
        assert stale_status(defs, instance, key) == "STALE", key
    assert [stale_status(defs, instance, IMAGE_CLASSIFICATIONS, b) for b in BATCHES] == ["STALE", "STALE"]
    assert [stale_status(defs, instance, IMAGE_EMBEDDINGS, b) for b in BATCHES] == ["FRESH", "FRESH"]

    requested, _ = ticks_until_settled(defs, instance, result, now + datetime.timedelta(hours=1))
    assert requested == {*WHOLE, IMAGE_CLASSIFICATIONS}
    for key in WHOLE:
        assert count(instance, key) == before[key] + 1, key  # once each: evaluation waited for the classifications
    assert count(instance, PROMPT_CENTROIDS) == before[PROMPT_CENTROIDS]
    for b in BATCHES:
        assert count(instance, IMAGE_CLASSIFICATIONS, b) == before[(IMAGE_CLASSIFICATIONS, b)] + 1
        assert count(instance, IMAGE_EMBEDDINGS, b) == before[(IMAGE_EMBEDDINGS, b)]
    assert latest(instance, IMAGE_EVALUATION).run_id != latest(instance, CATEGORY_ADAPTERS).run_id
    for key in WHOLE:
        assert stale_status(defs, instance, key) == "FRESH", key

    # the person's verdicts decide those rows; evaluation counts the twelve, the estimate the six of its queue
    with connect(layout.duckdb_path, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM image_classifications WHERE decided_by = 'person'").fetchone() == (12,)
    meta = latest(instance, IMAGE_EVALUATION).asset_materialization.metadata
    assert meta["labelled_images"].value == 12
    table = meta["estimated_from_review"].value
    assert [c.name for c in table.schema.columns] == list(ROW_COLUMNS)
    circle = next(r.data for r in table.records if r.data["category"] == "circle")
    assert circle["labelled_matches"] + circle["labelled_non_matches"] == 6 == meta["estimate_labels"].value
