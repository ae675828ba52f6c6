"""The assets through Dagster, on a real DagsterInstance in a temp dir."""

import datetime
import os
import subprocess
import sys

import dagster as dg
import duckdb
import pytest

from clip_assets.defs.execution import (
    BATCH_ASSETS,
    materialize,
    materialize_everything,
    observe_prompt_files,
    register_batches,
)
from clip_assets.definitions import build_definitions
from clip_assets.layout import DataLayout
from clip_assets.prompts import load_categories, prompt_version
from clip_assets.settings import REPO_ROOT

BATCHES = ["batch-001", "batch-002"]
EMBEDDINGS = dg.AssetKey("image_embeddings")
CENTROIDS = dg.AssetKey("prompt_centroids")
CLASSIFICATIONS = dg.AssetKey("image_classifications")
PROMPT_FILES = dg.AssetKey("prompt_files")
ALL_KEYS = [PROMPT_FILES, dg.AssetKey("image_manifest"), EMBEDDINGS, CENTROIDS, CLASSIFICATIONS]


def rows(settings, sql):
    with duckdb.connect(str(DataLayout(settings.data_dir).duckdb_path), read_only=True) as con:
        return con.execute(sql).fetchall()


def materialization_count(instance, key, partition=None):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1000
    ).records
    return len(records)


def test_code_location_validates_from_the_workspace():
    env = {**os.environ, "DAGSTER_HOME": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Validation successful" in done.stdout + done.stderr


def test_graph_and_automation_are_wired(settings):
    defs = build_definitions(settings)
    graph = defs.resolve_asset_graph()
    assert graph.get(CENTROIDS).parent_keys == {PROMPT_FILES}  # never the embeddings
    assert graph.get(EMBEDDINGS).parent_keys == {dg.AssetKey("image_manifest")}  # never the prompts
    assert graph.get(CLASSIFICATIONS).parent_keys == {EMBEDDINGS, CENTROIDS}
    for key in (dg.AssetKey("image_manifest"), EMBEDDINGS, CLASSIFICATIONS):
        assert graph.get(key).partitions_def.name == "image_batches"
    sensor = defs.resolve_sensor_def("clip_assets_automation")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert PROMPT_FILES in sensor.asset_selection.resolve(graph)  # sources are observed too
    assert graph.get(PROMPT_FILES).automation_condition is not None


def test_full_run_over_two_batches_then_rematerialize(settings, instance):
    defs = build_definitions(settings)
    materialize_everything(defs, instance, BATCHES)
    n_cats = len(load_categories(settings.prompts_dir))
    per_batch = rows(
        settings,
        "SELECT batch, count(*), count(DISTINCT (image_id, category)), count(DISTINCT model) "
        "FROM image_classifications GROUP BY batch ORDER BY batch",
    )
    assert per_batch == [("batch-001", 10 * n_cats, 10 * n_cats, 1), ("batch-002", 10 * n_cats, 10 * n_cats, 1)]
    assert sorted(instance.get_dynamic_partitions("image_batches")) == BATCHES
    record = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("image_manifest"), asset_partitions=["batch-002"]), limit=1
    ).records[0]
    meta = record.asset_materialization.metadata
    assert meta["dagster/row_count"].value == 12 and meta["unusable_files"].value == 2

    materialize(defs, instance, BATCH_ASSETS, partition_key="batch-001")
    assert rows(settings, "SELECT count(*), count(DISTINCT (batch, image_id, category)) FROM image_classifications") == [
        (20 * n_cats, 20 * n_cats)
    ]
    assert materialization_count(instance, CLASSIFICATIONS, "batch-001") == 2


def _run_requested(defs, instance, result):
    """Do what the daemon would: observe or materialize each requested asset partition, parents first."""
    if result.get_num_requested(PROMPT_FILES):
        observe_prompt_files(defs, instance)
    if result.get_num_requested(CENTROIDS):
        materialize(defs, instance, [CENTROIDS])
    for key in BATCH_ASSETS:
        for partition in sorted(result.get_requested_partitions(key)):
            materialize(defs, instance, [key], partition_key=partition)


def test_prompt_edit_rematerializes_centroids_and_classifications_only(settings, instance):
    defs = build_definitions(settings)
    materialize_everything(defs, instance, BATCHES)
    embeddings_before = {b: materialization_count(instance, EMBEDDINGS, b) for b in BATCHES}
    classifications_before = {b: materialization_count(instance, CLASSIFICATIONS, b) for b in BATCHES}
    centroids_before = materialization_count(instance, CENTROIDS)

    now = datetime.datetime.now(datetime.timezone.utc)
    result = dg.evaluate_automation_conditions(defs, instance, evaluation_time=now)
    _run_requested(defs, instance, result)  # settle whatever the first tick asks for

    path = settings.prompts_dir / "demo_shapes.toml"
    path.write_text(path.read_text().replace('"a star", "a photo of a star"', '"a star", "a five-pointed star"'))
    new_version = prompt_version(settings.prompts_dir)

    # prompt_files is observed on every cron tick; settled means nothing else is asked for any more.
    requested, quiet_ticks = set(), 0
    for minute in range(2, 14):
        result = dg.evaluate_automation_conditions(
            defs, instance, cursor=result.cursor, evaluation_time=now + datetime.timedelta(minutes=minute)
        )
        this_tick = {key for key in ALL_KEYS if result.get_num_requested(key)}
        requested |= this_tick
        _run_requested(defs, instance, result)
        quiet_ticks = quiet_ticks + 1 if this_tick <= {PROMPT_FILES} and CENTROIDS in requested else 0
        if quiet_ticks == 3:  # unchanged observations re-run nothing downstream
            break
    else:
        pytest.fail(f"automation did not settle; requested so far: {requested}")

    assert PROMPT_FILES in requested and CENTROIDS in requested and CLASSIFICATIONS in requested
    assert EMBEDDINGS not in requested and dg.AssetKey("image_manifest") not in requested
    assert materialization_count(instance, CENTROIDS) > centroids_before
    for b in BATCHES:
        assert materialization_count(instance, CLASSIFICATIONS, b) > classifications_before[b]
        assert materialization_count(instance, EMBEDDINGS, b) == embeddings_before[b]
    assert rows(settings, "SELECT DISTINCT prompt_version FROM prompt_centroids") == [(new_version,)]
    assert rows(settings, "SELECT DISTINCT prompt_version FROM image_classifications") == [(new_version,)]


def test_broken_prompt_file_fails_the_run_and_keeps_results(settings, instance):
    defs = build_definitions(settings)
    materialize_everything(defs, instance, BATCHES[:1])
    before = rows(settings, "SELECT * FROM image_classifications ORDER BY image_id, category")
    centroids = rows(settings, "SELECT * FROM prompt_centroids ORDER BY category, kind")
    path = settings.prompts_dir / "demo_shapes.toml"
    path.write_text(path.read_text() + "\n[categories.hexagon]\nnegative = [\"a circle\"]\n")
    result = materialize(defs, instance, [CENTROIDS], raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.cause.message if failure.step_failure_data.error.cause else ""
    assert "demo_shapes.toml: categories.hexagon.positive" in failure.step_failure_data.error.message + message
    assert rows(settings, "SELECT * FROM prompt_centroids ORDER BY category, kind") == centroids
    assert rows(settings, "SELECT * FROM image_classifications ORDER BY image_id, category") == before


def test_missing_weights_fail_the_embedding_run_with_the_fix(settings, instance, tmp_path):
    settings = settings.model_copy(update={"pretrained": str(tmp_path / "missing.safetensors")})
    defs = build_definitions(settings)
    register_batches(instance, BATCHES[:1])
    materialize(defs, instance, [dg.AssetKey("image_manifest")], partition_key="batch-001")
    result = materialize(defs, instance, [EMBEDDINGS], partition_key="batch-001", raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    error = failure.step_failure_data.error
    text = error.message + (error.cause.message if error.cause else "")
    assert "missing.safetensors" in text and "CLIP_ASSETS_PRETRAINED" in text
    assert not DataLayout(settings.data_dir).embeddings_path("batch-001").exists()
