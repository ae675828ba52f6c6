"""The assets through Dagster, on a real DagsterInstance in a temp dir."""

import base64
import datetime
import hashlib
import os
import subprocess
import sys

import dagster as dg
import pytest

from clip_assets.classification.prompts import load_categories, prompt_version
from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import REPO_ROOT
from clip_assets.definitions import build_definitions
from clip_assets.defs.classification.prompts import PROMPT_OBSERVATION_SENSOR
from clip_assets.defs.ingest.sensors import SPLIT_SENSOR, split_failed_batch_runs
from clip_assets.defs.tuning.fine_tuning import CAPTIONS_OBSERVATION_SENSOR
from clip_assets.defs.tuning.labels import LABELS_OBSERVATION_SENSOR
from clip_assets.instance.dagster_internals import WILL_RETRY_TAG
from clip_assets.instance.execution import (
    BATCH_ASSETS,
    QUIET_CONSOLE,
    materialize,
    materialize_everything,
    observe,
    register_batches,
)
from clip_assets.model.clip_model import model_identity
from clip_assets.model.fine_tuned_weights import fine_tuned_checkpoint
from clip_assets.search.exact_search import stored_models
from clip_assets.storage.file_hashes import SOURCE_VERSION_CHARS, content_digest
from clip_assets.storage.warehouse import connect, read_centroids
from clip_assets.tuning.adapter_store import adapter_version
from clip_assets_tests.support.dagster_ticks import stale_status

BATCHES = ["batch-001", "batch-002"]
EMBEDDINGS = dg.AssetKey("image_embeddings")
CENTROIDS = dg.AssetKey("prompt_centroids")
CLASSIFICATIONS = dg.AssetKey("image_classifications")
PROMPT_FILES = dg.AssetKey("prompt_files")
LABELS_FILE = dg.AssetKey("labels_file")
REVIEW_LABELS = dg.AssetKey("review_labels")
ADAPTERS = dg.AssetKey("category_adapters")
CAPTIONS_FILE = dg.AssetKey("captions_file")
FINE_TUNED_MODEL = dg.AssetKey("fine_tuned_model")
ALL_KEYS = [PROMPT_FILES, LABELS_FILE, CAPTIONS_FILE, FINE_TUNED_MODEL, dg.AssetKey("image_manifest"), EMBEDDINGS,
            CENTROIDS, ADAPTERS, CLASSIFICATIONS]


def rows(settings, sql):
    with connect(DataLayout(settings.data_dir).duckdb_path, read_only=True) as con:
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
    assert graph.get(ADAPTERS).parent_keys == {CENTROIDS, LABELS_FILE, REVIEW_LABELS}  # nor the labels
    assert graph.get(CLASSIFICATIONS).parent_keys == {EMBEDDINGS, CENTROIDS, ADAPTERS, REVIEW_LABELS}
    for key in (dg.AssetKey("image_manifest"), EMBEDDINGS, CLASSIFICATIONS):
        assert graph.get(key).partitions_def.name == "image_batches"
    for name in ("clip_assets_automation", "prompt_files_observation", "labels_file_observation",
                 "review_labels_observation"):
        assert defs.resolve_sensor_def(name).default_status == dg.DefaultSensorStatus.RUNNING
    # observed by a sensor without a run, never requested as a run by the automation sensor
    assert graph.get(PROMPT_FILES).automation_condition is None and graph.get(LABELS_FILE).automation_condition is None
    assert graph.get(CENTROIDS).automation_condition is not None and graph.get(ADAPTERS).automation_condition is not None


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
    assert meta["dagster/row_count"].value == 12 and meta["unusable_files"].value == 1  # the empty file (stat)

    materialize(defs, instance, BATCH_ASSETS, partition_key="batch-001")
    assert rows(settings, "SELECT count(*), count(DISTINCT (batch, image_id, category)) FROM image_classifications") == [
        (20 * n_cats, 20 * n_cats)
    ]
    assert materialization_count(instance, CLASSIFICATIONS, "batch-001") == 2


def _run_requested(defs, instance, result):
    """Do what the daemon would: materialize what was requested, parents first, each asset's
    partitions in one run as its backfill policy groups them (two batches here: one range run)."""
    unpartitioned = [key for key in (FINE_TUNED_MODEL, CENTROIDS, ADAPTERS) if result.get_num_requested(key)]
    if unpartitioned:
        materialize(defs, instance, unpartitioned)
    for key in BATCH_ASSETS:
        partitions = sorted(result.get_requested_partitions(key))
        if partitions:
            materialize(defs, instance, [key], partition_range=(partitions[0], partitions[-1]))


def _ticks_until_settled(defs, instance, result, now):
    """Each tick: the observation sensors' work (a runless observation when a hash changed), then the
    automation sensor's, then the runs it asked for. Settled means nothing is asked for any more.
    Returns what was requested, each tick's observations per observed asset, and the last evaluation."""
    requested, quiet_ticks, observations = set(), 0, {PROMPT_FILES: [], LABELS_FILE: [], CAPTIONS_FILE: []}
    for tick in range(2, 14):
        observations[PROMPT_FILES].append(observe(defs, instance, PROMPT_OBSERVATION_SENSOR))
        observations[LABELS_FILE].append(observe(defs, instance, LABELS_OBSERVATION_SENSOR))
        observations[CAPTIONS_FILE].append(observe(defs, instance, CAPTIONS_OBSERVATION_SENSOR))
        result = dg.evaluate_automation_conditions(
            defs, instance, cursor=result.cursor, evaluation_time=now + datetime.timedelta(minutes=tick)
        )
        this_tick = {key for key in ALL_KEYS if result.get_num_requested(key)}
        requested |= this_tick
        _run_requested(defs, instance, result)
        quiet_ticks = quiet_ticks + 1 if not this_tick and requested else 0
        if quiet_ticks == 3:  # unchanged files are not observed again and re-run nothing
            return requested, observations, result
    pytest.fail(f"automation did not settle; requested so far: {requested}")


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

    requested, observations, _ = _ticks_until_settled(defs, instance, result, now)
    observations = observations[PROMPT_FILES]

    # one observation, of the new version, recorded without a run; nothing else observed since
    assert [o.data_version for o in observations if o is not None] == [new_version]
    latest = instance.fetch_observations(PROMPT_FILES, limit=1).records[0]
    assert latest.asset_observation.data_version == new_version and latest.run_id == ""
    assert not instance.get_runs(filters=dg.RunsFilter(job_name="observe_prompt_files"))
    assert CENTROIDS in requested and ADAPTERS in requested and CLASSIFICATIONS in requested
    assert PROMPT_FILES not in requested
    assert EMBEDDINGS not in requested and dg.AssetKey("image_manifest") not in requested
    assert materialization_count(instance, CENTROIDS) > centroids_before
    for b in BATCHES:
        assert materialization_count(instance, CLASSIFICATIONS, b) > classifications_before[b]
        assert materialization_count(instance, EMBEDDINGS, b) == embeddings_before[b]
    assert rows(settings, "SELECT DISTINCT prompt_version FROM prompt_centroids") == [(new_version,)]
    assert rows(settings, "SELECT DISTINCT prompt_version FROM image_classifications") == [(new_version,)]
    # the re-run covered both batches in one run; each batch's materialization tells its own story
    latest = {b: instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=CLASSIFICATIONS, asset_partitions=[b]), limit=1).records[0] for b in BATCHES}
    assert latest["batch-001"].run_id == latest["batch-002"].run_id
    n_cats = len(load_categories(settings.prompts_dir))
    for b, record in latest.items():
        meta = record.asset_materialization.metadata
        assert meta["dagster/row_count"].value == 10 * n_cats and meta["images"].value == 10
        assert meta["batches_in_run"].value == 2 and meta["prompt_version"].value == new_version
        assert {r.data["path"].split("/")[0] for r in meta["top_images"].value.records} == {b}


def test_labels_edit_rematerializes_adapters_and_classifications_only(settings, instance, collection, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text((collection / "labels.csv").read_text())
    defs = build_definitions(settings.model_copy(update={"labels_path": labels}))
    materialize_everything(defs, instance, BATCHES)
    materialize(defs, instance, [ADAPTERS])  # the labelled images have embeddings now
    now = datetime.datetime.now(datetime.timezone.utc)
    result = dg.evaluate_automation_conditions(defs, instance, evaluation_time=now)
    _run_requested(defs, instance, result)  # settle whatever the first tick asks for
    before = {key: materialization_count(instance, key) for key in (CENTROIDS, ADAPTERS)}
    before |= {(key, b): materialization_count(instance, key, b) for key in (EMBEDDINGS, CLASSIFICATIONS) for b in BATCHES}
    old_version = rows(settings, "SELECT DISTINCT adapter_version FROM image_classifications")

    lines = labels.read_text().splitlines()
    labels.write_text("\n".join(lines[:-1]) + "\n")  # one labelled image fewer

    requested, observations, _ = _ticks_until_settled(defs, instance, result, now)
    assert [o.data_version for o in observations[LABELS_FILE] if o is not None] == [content_digest(labels, SOURCE_VERSION_CHARS)]
    assert not any(observations[PROMPT_FILES])
    assert ADAPTERS in requested and CLASSIFICATIONS in requested
    assert not requested & {CENTROIDS, EMBEDDINGS, dg.AssetKey("image_manifest"), LABELS_FILE, PROMPT_FILES}
    assert materialization_count(instance, ADAPTERS) > before[ADAPTERS]
    assert materialization_count(instance, CENTROIDS) == before[CENTROIDS]
    for b in BATCHES:
        assert materialization_count(instance, CLASSIFICATIONS, b) > before[(CLASSIFICATIONS, b)]
        assert materialization_count(instance, EMBEDDINGS, b) == before[(EMBEDDINGS, b)]
    new_version = adapter_version(content_digest(labels, SOURCE_VERSION_CHARS), read_centroids(DataLayout(settings.data_dir).duckdb_path), None)
    assert rows(settings, "SELECT DISTINCT adapter_version FROM image_classifications") == [(new_version,)] != old_version


def latest_data_version(instance, key):
    record = instance.fetch_materializations(key, limit=1).records[0]
    return record.asset_materialization.tags["dagster/data_version"]


def models_made_with(settings):
    """The model identities of the stored embeddings, centroids and classification rows."""
    layout = DataLayout(settings.data_dir)
    return {
        "embeddings": set().union(*(stored_models(f) for f in layout.embedding_files())),
        "centroids": {m for (m,) in rows(settings, "SELECT DISTINCT model FROM prompt_centroids")},
        "classifications": {m for (m,) in rows(settings, "SELECT DISTINCT model FROM image_classifications")},
    }


def test_opted_in_the_fine_tuned_model_encodes_and_a_captions_edit_re_embeds(settings, instance, collection, tmp_path):
    assert build_definitions(settings).resolve_asset_graph().has(FINE_TUNED_MODEL) is False  # not opted in
    captions = tmp_path / "captions.csv"
    captions.write_text((collection / "labels.csv").read_text())  # path, caption (and labels, unused)
    settings = settings.model_copy(update={"fine_tune_captions": captions, "use_fine_tuned": True, "fine_tune_epochs": 1})
    defs = build_definitions(settings)
    graph = defs.resolve_asset_graph()
    assert graph.get(FINE_TUNED_MODEL).parent_keys == {CAPTIONS_FILE}
    assert graph.get(EMBEDDINGS).parent_keys == {dg.AssetKey("image_manifest"), FINE_TUNED_MODEL}
    assert graph.get(CENTROIDS).parent_keys == {PROMPT_FILES, FINE_TUNED_MODEL}
    layout = DataLayout(settings.data_dir)
    materialize_everything(defs, instance, BATCHES)

    first = fine_tuned_checkpoint(layout)
    version = latest_data_version(instance, FINE_TUNED_MODEL)
    assert first.parent == layout.fine_tuned_models_dir and version == hashlib.sha256(first.read_bytes()).hexdigest()[:12] and version in first.name
    tuned = model_identity(settings.model, str(first))
    assert version in tuned and tuned != model_identity(settings.model, settings.pretrained)
    assert models_made_with(settings) == {"embeddings": {tuned}, "centroids": {tuned}, "classifications": {tuned}}
    assert all(stale_status(defs, instance, EMBEDDINGS, b) == "FRESH" for b in BATCHES)

    # a prompt edit re-runs the centroids and what follows them, never the fine-tuning nor the embeddings
    now = datetime.datetime.now(datetime.timezone.utc)
    result = dg.evaluate_automation_conditions(defs, instance, evaluation_time=now)
    _run_requested(defs, instance, result)
    path = settings.prompts_dir / "demo_shapes.toml"
    path.write_text(path.read_text().replace('"a star", "a photo of a star"', '"a star", "a five-pointed star"'))
    requested, _, result = _ticks_until_settled(defs, instance, result, now)
    assert CENTROIDS in requested and CLASSIFICATIONS in requested
    assert not requested & {FINE_TUNED_MODEL, EMBEDDINGS, CAPTIONS_FILE}
    assert fine_tuned_checkpoint(layout) == first and materialization_count(instance, FINE_TUNED_MODEL) == 1

    # a captions edit: the fine-tuned model is stale, then, once re-tuned, the embeddings of every batch
    captions.write_text("\n".join(captions.read_text().splitlines()[:-2]) + "\n")  # two captioned images fewer
    assert observe(defs, instance, CAPTIONS_OBSERVATION_SENSOR).data_version == content_digest(captions, SOURCE_VERSION_CHARS)
    assert stale_status(defs, instance, FINE_TUNED_MODEL) == "STALE"
    materialize(defs, instance, [FINE_TUNED_MODEL])
    second = fine_tuned_checkpoint(layout)
    assert second != first and latest_data_version(instance, FINE_TUNED_MODEL) == hashlib.sha256(second.read_bytes()).hexdigest()[:12]
    assert stale_status(defs, instance, FINE_TUNED_MODEL) == "FRESH"
    assert [stale_status(defs, instance, EMBEDDINGS, b) for b in BATCHES] == ["STALE", "STALE"]
    assert stale_status(defs, instance, CENTROIDS) == "STALE"

    # in between, centroids of the new model and embeddings of the old one: classification refuses
    materialize(defs, instance, [CENTROIDS])
    retuned = model_identity(settings.model, str(second))
    before = rows(settings, "SELECT * FROM image_classifications ORDER BY batch, image_id, category")
    refused = materialize(defs, instance, [CLASSIFICATIONS], partition_key="batch-001", raise_on_error=False)
    assert not refused.success
    error = next(e for e in refused.all_events if e.is_step_failure).step_failure_data.error
    assert retuned in error.message + (error.cause.message if error.cause else "")
    assert rows(settings, "SELECT * FROM image_classifications ORDER BY batch, image_id, category") == before

    # the automation re-embeds every batch with the new model, and classifies again
    requested, _, _ = _ticks_until_settled(defs, instance, result, now + datetime.timedelta(hours=1))
    assert EMBEDDINGS in requested and CLASSIFICATIONS in requested
    assert models_made_with(settings) == {"embeddings": {retuned}, "centroids": {retuned}, "classifications": {retuned}}
    assert all(stale_status(defs, instance, EMBEDDINGS, b) == "FRESH" for b in BATCHES)

    # a broken captions file fails the fine-tuning, naming the line, and the model in use stays
    captions.write_text(captions.read_text() + "batch-001/missing.png,a red circle,red;circle\n")
    broken = materialize(defs, instance, [FINE_TUNED_MODEL], raise_on_error=False)
    assert not broken.success
    error = next(e for e in broken.all_events if e.is_step_failure).step_failure_data.error
    assert "field 'path': cannot read image" in error.message + (error.cause.message if error.cause else "")
    assert fine_tuned_checkpoint(layout) == second


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


def _decoded_picture(value) -> bytes:
    return base64.b64decode(value.value.split("base64,")[1].rstrip(")"))


def test_a_multi_batch_run_records_each_batch_with_its_own_metadata(settings, instance):
    """A backfill range run (as the UI's partition picker, the discovery sensor and a prompt edit's
    re-run launch them): each batch gets exactly one materialization per asset, with its own figures."""
    defs = build_definitions(settings)
    register_batches(instance, BATCHES)
    observe(defs, instance, PROMPT_OBSERVATION_SENSOR)
    materialize(defs, instance, [CENTROIDS])
    result = materialize(defs, instance, BATCH_ASSETS, partition_range=("batch-001", "batch-002"))
    n_cats = len(load_categories(settings.prompts_dir))
    matched = dict(rows(settings, "SELECT batch || '/' || category, count(*) FILTER (WHERE matched) "
                                  "FROM image_classifications GROUP BY ALL"))

    def metadata(key: str) -> dict[str, dict]:
        records = instance.fetch_materializations(dg.AssetKey(key), limit=100).records
        assert sorted(r.partition_key for r in records) == BATCHES, key  # one per batch, no run totals
        assert {r.run_id for r in records} == {result.run_id}
        return {r.partition_key: r.asset_materialization.metadata for r in records}

    manifest = metadata("image_manifest")
    assert {b: m["dagster/row_count"].value for b, m in manifest.items()} == {"batch-001": 10, "batch-002": 12}
    assert {b: m["unusable_files"].value for b, m in manifest.items()} == {"batch-001": 0, "batch-002": 1}
    assert manifest["batch-001"]["unusable_examples"].value.records == []
    assert {r.data["path"] for r in manifest["batch-002"]["unusable_examples"].value.records} == {
        "batch-002/broken-empty.jpg"}
    assert all(m["path"].value.endswith(f"{b}.parquet") for b, m in manifest.items())
    assert manifest["batch-001"]["files_fingerprint"].value != manifest["batch-002"]["files_fingerprint"].value

    embeddings = metadata("image_embeddings")
    assert {b: (m["dagster/row_count"].value, m["encoded"].value) for b, m in embeddings.items()} == {
        "batch-001": (10, 10), "batch-002": (10, 10)}
    assert {b: m["unusable_in_manifest"].value for b, m in embeddings.items()} == {"batch-001": 0, "batch-002": 1}
    # the text file named .png is found by decoding it: recorded with the embedding step's failures
    assert {b: m["failed_images"].value for b, m in embeddings.items()} == {"batch-001": 0, "batch-002": 1}
    assert {r.data["path"] for r in embeddings["batch-002"]["failure_examples"].value.records} == {
        "batch-002/notes-not-an-image.png"}

    classifications = metadata("image_classifications")
    for batch, meta in classifications.items():
        assert meta["dagster/row_count"].value == 10 * n_cats and meta["images"].value == 10
        assert meta["batches_in_run"].value == 2
        table = meta["matches_per_category"].value
        assert [c.name for c in table.schema.columns] == ["category", "images_matched", "share"]
        assert {r.data["category"]: r.data["images_matched"] for r in table.records} == {
            c.name: matched[f"{batch}/{c.name}"] for c in load_categories(settings.prompts_dir)}
        assert {r.data["path"].split("/")[0] for r in meta["top_images"].value.records} == {batch}
        assert _decoded_picture(meta["score_distribution"]).startswith(b"\x89PNG")
        sheet = _decoded_picture(meta["contact_sheet"])
        assert sheet.startswith(b"\xff\xd8\xff") and len(sheet) < 100_000


def test_a_bad_batch_fails_alone_and_the_good_ones_of_its_run_are_done(settings, instance):
    """A range with a batch that can't be done (a typo in the materialize dialog: no folder behind it).
    The run does the other batches, fails naming the bad one, and the split sensor runs each batch alone."""
    defs = build_definitions(settings)
    layout = DataLayout(settings.data_dir)
    register_batches(instance, ["batch-001", "batch-00l", "batch-002"])
    observe(defs, instance, PROMPT_OBSERVATION_SENSOR)
    materialize(defs, instance, [CENTROIDS])
    result = materialize(defs, instance, BATCH_ASSETS, partition_range=("batch-001", "batch-002"), raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert failure.step_key == "image_manifest"
    missing = f"Batch folder batch-00l does not exist under {settings.image_root}; folders there: batch-001, batch-002."
    data = failure.step_failure_data.user_failure_data
    assert data.description.startswith(f"1 of 3 batches failed, the other 2 were done: batch-00l: {missing}")
    assert [r.data for r in data.metadata["failed_batches"].value.records] == [{"batch": "batch-00l", "reason": missing}]
    assert layout.manifest_path("batch-001").exists() and layout.manifest_path("batch-002").exists()

    sensor = defs.resolve_sensor_def(SPLIT_SENSOR)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    requests = split_failed_batch_runs(failure_context(instance, result))
    assert [r.partition_key for r in requests] == ["batch-001", "batch-00l", "batch-002"]
    assert all(list(r.asset_selection) == BATCH_ASSETS and r.job_name == "classify_image_batch" for r in requests)
    outcomes = {
        r.partition_key: defs.resolve_job_def(r.job_name).execute_in_process(
            instance=instance, partition_key=r.partition_key, asset_selection=r.asset_selection,
            tags=r.tags, run_config=QUIET_CONSOLE, raise_on_error=False)
        for r in requests
    }
    assert {b: r.success for b, r in outcomes.items()} == {"batch-001": True, "batch-00l": False, "batch-002": True}
    alone = next(e for e in outcomes["batch-00l"].all_events if e.is_step_failure)
    assert alone.step_failure_data.user_failure_data.description == missing
    n_cats = len(load_categories(settings.prompts_dir))
    assert rows(settings, "SELECT batch, count(*) FROM image_classifications GROUP BY batch ORDER BY batch") == [
        ("batch-001", 10 * n_cats), ("batch-002", 10 * n_cats)]
    assert [materialization_count(instance, CLASSIFICATIONS, b) for b in ("batch-001", "batch-002")] == [1, 1]

    # A failed run of one batch is not split again: nothing loops.
    assert isinstance(split_failed_batch_runs(failure_context(instance, outcomes["batch-00l"])), dg.SkipReason)
    # A run Dagster will retry as a whole (its worker died) is left to the retry, not run twice.
    instance.add_run_tags(result.run_id, {WILL_RETRY_TAG: "true"})
    assert isinstance(split_failed_batch_runs(failure_context(instance, result)), dg.SkipReason)


def failure_context(instance, result):
    """What the daemon hands a run-failure sensor for this failed run."""
    return dg.build_run_status_sensor_context(
        sensor_name=SPLIT_SENSOR, dagster_event=result.get_run_failure_event(), dagster_instance=instance,
        dagster_run=instance.get_run_by_id(result.run_id),
    ).for_run_failure()
