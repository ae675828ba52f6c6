"""Errors where people look (clip_assets.defs.failures, clip_assets.defs.check_results): a person's mistake
fails its run with one sentence and what to fix, and a warning a batch earned tags its run, on a real
Dagster instance in a temp dir."""

from __future__ import annotations

import importlib
import logging

import dagster as dg
import pytest

from clip_assets.definitions import build_definitions
from clip_assets.defs.asset_keys import IMAGE_EMBEDDINGS, IMAGE_MANIFEST, PROMPT_CENTROIDS
from clip_assets.defs.check_results import WARNING_TAG
from clip_assets.defs.failures import FIXES, as_failure
from clip_assets.instance.execution import materialize, register_batches


def test_every_error_named_for_a_fix_exists():
    """FIXES names the errors by module and class (so it imports none of them): a rename must show here."""
    for name in FIXES:
        module, cls = name.rsplit(".", 1)
        assert issubclass(getattr(importlib.import_module(module), cls), Exception), name


def test_a_bug_keeps_its_trace():
    assert as_failure(KeyError("batch")) is None


def step_failures(instance: dg.DagsterInstance, run_id: str) -> list[dg.EventLogEntry]:
    return instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)


def test_a_misspelt_field_fails_the_run_with_one_line_the_file_the_field_and_the_fix(settings, instance):
    defs = build_definitions(settings)
    path = settings.prompts_dir / "demo_shapes.toml"
    path.write_text(path.read_text() + '\n[categories.kite]\npositve = ["a kite"]\n')
    result = materialize(defs, instance, [PROMPT_CENTROIDS], raise_on_error=False)
    assert not result.success
    # as the run page reads it: the event log of the run in the instance
    (entry,) = step_failures(instance, result.run_id)
    failure = entry.dagster_event.step_failure_data
    said = failure.user_failure_data
    assert said.description == (
        f"Invalid prompt file {path}: categories.kite.positve: Extra inputs are not permitted; did you mean 'positive'?"
    )
    assert said.metadata["file"] == dg.MetadataValue.path(str(path))
    assert said.metadata["field"].value == "categories.kite.positve"
    assert "prompt_centroids runs again" in said.metadata["fix"].value
    assert said.metadata["error"].value == "PromptFileError"
    # the error is the sentence, with no chained trace of the library's own error under it
    assert failure.error.cause is None and failure.error.context is None
    assert failure.error.message.strip().endswith("did you mean 'positive'?")
    assert "\n" not in failure.error.message.strip()
    # the trace is kept, in the run's debug log
    traces = [e.user_message for e in instance.all_logs(result.run_id) if e.level == logging.DEBUG]
    assert any("Traceback" in t and "PromptFileError" in t for t in traces)


def test_missing_weights_say_what_to_set(settings, instance, tmp_path):
    defs = build_definitions(settings.model_copy(update={"pretrained": str(tmp_path / "missing.safetensors")}))
    register_batches(instance, ["batch-001"])
    materialize(defs, instance, [IMAGE_MANIFEST], partition_key="batch-001")
    result = materialize(defs, instance, [IMAGE_EMBEDDINGS], partition_key="batch-001", raise_on_error=False)
    (entry,) = step_failures(instance, result.run_id)
    said = entry.dagster_event.step_failure_data.user_failure_data
    assert said.description.startswith("Checkpoint file not found:") and "missing.safetensors" in said.description
    assert "CLIP_ASSETS_PRETRAINED" in said.metadata["fix"].value


@pytest.mark.parametrize("batches", [["batch-002"], ["batch-001", "batch-002"]], ids=["one batch", "a range"])
def test_a_batch_with_unusable_files_tags_its_run_and_its_materialization(settings, instance, batches):
    """batch-002 holds 2 unusable files of 12 (17%, above the 5% the check warns at): a green run, which
    the runs list shows tagged, and batch-002's materialization says why; batch-001's does not."""
    defs = build_definitions(settings)
    register_batches(instance, ["batch-001", "batch-002"])
    keys = [IMAGE_MANIFEST, IMAGE_EMBEDDINGS]
    if len(batches) == 1:
        result = materialize(defs, instance, keys, partition_key=batches[0])
    else:
        result = materialize(defs, instance, keys, partition_range=(batches[0], batches[-1]))
    assert result.success
    assert instance.get_run_by_id(result.run_id).tags[WARNING_TAG] == "17% of files unusable in batch-002"
    records = {
        r.partition_key: r.asset_materialization.metadata
        for r in instance.fetch_materializations(IMAGE_EMBEDDINGS, limit=10).records
    }
    assert records["batch-002"]["warning: failure_share"].value.startswith("2 of 12 files could not be embedded")
    assert all(not key.startswith("warning") for key in records.get("batch-001", {}))


def test_a_batch_without_unusable_files_leaves_its_run_untagged(settings, instance):
    defs = build_definitions(settings)
    register_batches(instance, ["batch-001"])
    result = materialize(defs, instance, [IMAGE_MANIFEST, IMAGE_EMBEDDINGS], partition_key="batch-001")
    assert result.success and WARNING_TAG not in instance.get_run_by_id(result.run_id).tags
