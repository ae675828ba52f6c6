"""Sensor and schedule on a real Dagster instance: ticks evaluated for real, requested runs executed.
The discovery sensor and the rescan schedule run on each instance storage, SQLite and Postgres
(`instance_on_each_storage`, clip_assets_tests/conftest.py).

`tick` and `run_requests` (clip_assets_tests/support/dagster_ticks.py) do what the daemon does with a
tick's result: add the requested partitions, then launch each requested run (here in-process, one
after another).
"""

import datetime
import shutil

import dagster as dg
import pytest

from clip_assets.classification.prompts import load_categories
from clip_assets.definitions import build_definitions
from clip_assets.defs.ingest.schedules import RESCAN_SCHEDULE
from clip_assets.defs.ingest.sensors import BATCH_DISCOVERY_SENSOR
from clip_assets.demo.shapes import write_collection
from clip_assets_tests.support.dagster_ticks import classification_counts, run_requests, tick

BATCH_KEYS = [dg.AssetKey(k) for k in ("image_manifest", "image_embeddings", "image_classifications")]


@pytest.fixture
def ops_settings(settings, tmp_path):
    """Three fresh batches of 4 images under an image root of this test's own."""
    root = tmp_path / "images"
    write_collection(root, batches=3, per_batch=4, seed=11)
    return settings.model_copy(update={"image_root": root})


def evaluate_schedule(schedule, defs, instance):
    with dg.build_schedule_context(
        instance=instance, repository_def=defs.get_repository_def(), resources=defs.resources
    ) as context:
        return schedule.evaluate_tick(context)


def materializations(instance, key, partition=None):
    return len(instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1000
    ).records)


def test_discovery_sensor_classifies_new_batches_on_an_empty_instance(ops_settings, instance_on_each_storage):
    instance = instance_on_each_storage
    defs = build_definitions(ops_settings)
    sensor = defs.resolve_sensor_def(BATCH_DISCOVERY_SENSOR)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    n_cats = len(load_categories(ops_settings.prompts_dir))

    first = tick(defs, instance, None)  # nothing built yet: registers batches, builds centroids first
    assert sorted(instance.get_dynamic_partitions("image_batches")) == ["batch-001", "batch-002", "batch-003"]
    assert [r.job_name for r in first.run_requests] == ["prompt_centroids_from_prompt_files"]
    assert materializations(instance, dg.AssetKey("prompt_centroids")) == 1

    second = tick(defs, instance, first.cursor)  # centroids exist: the pending batches run, as one range
    assert [r.partition_key_range for r in second.run_requests] == [dg.PartitionKeyRange("batch-001", "batch-003")]
    # 4 images per batch; the last batch's two extra files are not images and are skipped
    assert classification_counts(ops_settings) == [(f"batch-00{i}", 4 * n_cats, 4 * n_cats) for i in (1, 2, 3)]

    third = tick(defs, instance, second.cursor)  # nothing new: no run, no listing
    assert not third.run_requests and third.cursor == second.cursor

    write_collection(ops_settings.image_root / "later", batches=1, per_batch=4, seed=12)
    shutil.move(ops_settings.image_root / "later" / "batch-001", ops_settings.image_root / "batch-004")
    shutil.rmtree(ops_settings.image_root / "later")
    fourth = tick(defs, instance, third.cursor)
    # one batch: a run of that partition (the Runs list shows which), not a range of one
    assert [(r.partition_key, r.partition_key_range) for r in fourth.run_requests] == [("batch-004", None)]
    assert [b for b, *_ in classification_counts(ops_settings)] == ["batch-001", "batch-002", "batch-003", "batch-004"]
    assert materializations(instance, dg.AssetKey("prompt_centroids")) == 1

    # The automation sensor does not redo what the discovery runs did (same-run updates are handled).
    result = dg.evaluate_automation_conditions(defs, instance)
    result = dg.evaluate_automation_conditions(
        defs, instance, cursor=result.cursor,
        evaluation_time=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=40),
    )
    assert all(not result.get_num_requested(k) for k in BATCH_KEYS + [dg.AssetKey("prompt_centroids")])


def test_rescan_schedule_reruns_only_the_batch_whose_files_changed(ops_settings, instance_on_each_storage):
    instance = instance_on_each_storage
    defs = build_definitions(ops_settings)
    first = tick(defs, instance, None)
    tick(defs, instance, first.cursor)
    before = {k: {b: materializations(instance, k, b) for b in ("batch-001", "batch-002", "batch-003")}
              for k in BATCH_KEYS}

    schedule = defs.resolve_schedule_def(RESCAN_SCHEDULE)
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    quiet = evaluate_schedule(schedule, defs, instance)
    assert not quiet.run_requests and "None of 3 batches changed" in quiet.skip_message

    # Two batches changed, not neighbours: two runs (a tick of several requests needs run keys).
    extra = next((ops_settings.image_root / "batch-002").glob("*.png"))
    shutil.copy(extra, ops_settings.image_root / "batch-001" / "copied.png")
    shutil.copy(extra, ops_settings.image_root / "batch-003" / "copied.png")
    data = evaluate_schedule(schedule, defs, instance)
    assert [r.partition_key for r in data.run_requests] == ["batch-001", "batch-003"]
    run_requests(defs, instance, data.run_requests)
    for key in BATCH_KEYS:
        assert materializations(instance, key, "batch-001") == before[key]["batch-001"] + 1
        assert materializations(instance, key, "batch-002") == before[key]["batch-002"]
        assert materializations(instance, key, "batch-003") == before[key]["batch-003"] + 1
    n_cats = len(load_categories(ops_settings.prompts_dir))
    counts = dict((batch, rows) for batch, rows, _ in classification_counts(ops_settings))
    assert counts["batch-001"] == 5 * n_cats and counts["batch-002"] == 4 * n_cats


def test_rescan_cron_comes_from_the_environment(ops_settings, monkeypatch):
    from clip_assets.config.settings import Settings

    monkeypatch.setenv("CLIP_ASSETS_RESCAN_CRON", "*/15 * * * *")
    assert Settings.from_env().rescan_cron == "*/15 * * * *"
    defs = build_definitions(ops_settings.model_copy(update={"rescan_cron": "*/15 * * * *"}))
    assert defs.resolve_schedule_def(RESCAN_SCHEDULE).cron_schedule == "*/15 * * * *"


def test_every_asset_shows_description_group_kinds_owner_and_code_version(ops_settings):
    graph = build_definitions(ops_settings).resolve_asset_graph()
    keys = graph.get_all_asset_keys()
    # the four-asset pipeline with prompt_files; labels_file, review_labels and category_adapters; evaluation,
    # calibration, gallery; search index, copy_threshold, near-duplicates
    assert len(keys) == 14
    for key in keys:
        node = graph.get(key)
        shown = {"description": node.description, "group": node.group_name, "kinds": node.kinds,
                 "owners": node.owners, "code_version": node.code_version}
        assert all(shown.values()), (key, shown)


def test_a_folder_dagster_refuses_as_a_partition_key_does_not_stop_the_tick(ops_settings, instance):
    """Before, adding 'a...b' as a partition raised in every tick, so no new batch was ever registered."""
    (ops_settings.image_root / "a...b").mkdir()
    defs = build_definitions(ops_settings)
    first = tick(defs, instance, None)
    assert sorted(instance.get_dynamic_partitions("image_batches")) == ["batch-001", "batch-002", "batch-003"]
    second = tick(defs, instance, first.cursor)
    assert [r.partition_key_range for r in second.run_requests] == [dg.PartitionKeyRange("batch-001", "batch-003")]
    third = tick(defs, instance, second.cursor)
    assert not third.run_requests
    (ops_settings.image_root / "new...folder").mkdir()  # the root changed: listed again, the refusal is said
    fourth = tick(defs, instance, third.cursor)
    assert "Not a batch: 'new...folder'" in fourth.skip_message
