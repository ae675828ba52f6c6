"""The private Dagster names the project relies on (clip_assets.instance.dagster_internals) still mean
what it relies on: a Dagster release that moves or changes one fails here, naming it."""

import inspect

import dagster as dg

from clip_assets.config.settings import Settings
from clip_assets.definitions import build_definitions
from clip_assets.ingest.batch_discovery import INVALID_PARTITION_SUBSTRINGS as OURS
from clip_assets.instance import dagster_internals as internals


def test_the_partition_range_tags_are_what_a_backfill_run_carries():
    request = dg.RunRequest(run_key="r", tags=internals.partition_range_tags("batch-001", "batch-009"))
    assert request.partition_key_range == dg.PartitionKeyRange("batch-001", "batch-009"), (
        "dagster_internals.ASSET_PARTITION_RANGE_*_TAG no longer make a RunRequest's partition range"
    )
    assert internals.partition_range(request.tags) == ("batch-001", "batch-009")
    assert internals.partition_range({}) is None


def test_the_data_version_tags_give_an_observation_its_data_version():
    observation = dg.AssetObservation("prompt_files", tags=internals.data_version_tags("abc123"))
    assert observation.data_version == "abc123", (
        "dagster_internals.DATA_VERSION_TAG no longer sets an AssetObservation's data_version"
    )


def test_the_run_health_types_are_the_launcher_api():
    assert {"RUNNING", "NOT_FOUND", "FAILED", "SUCCESS", "UNKNOWN"} <= {s.name for s in internals.WorkerStatus}
    result = internals.CheckRunHealthResult(internals.WorkerStatus.RUNNING, "alive")
    assert result.status is internals.WorkerStatus.RUNNING and result.msg == "alive"
    assert internals.GRPC_INFO_TAG == ".dagster/grpc_info", "the tag a run sent to a code server carries changed"


def test_the_library_copy_of_the_forbidden_partition_substrings_is_dagsters():
    assert tuple(OURS) == tuple(internals.INVALID_PARTITION_SUBSTRINGS), (
        "Dagster changed what a partition key may not contain: update INVALID_PARTITION_SUBSTRINGS in "
        "clip_assets/ingest/batch_discovery.py"
    )


def test_the_in_process_executor_is_still_built_from_the_pieces_the_pool_wait_rebuilds_it_from():
    def parameters(function) -> list[str]:
        return list(inspect.signature(function).parameters)

    assert parameters(internals.inner_plan_execution_iterator) == [
        "job_context",
        "execution_plan",
        "instance_concurrency_context",
    ], "inner_plan_execution_iterator changed: clip_assets/instance/executor.py passes it the PoolWait"
    assert {
        "job",
        "retry_mode",
        "execution_plan",
        "run_config",
        "dagster_run",
        "instance",
        "raise_on_error",
        "output_capture",
        "step_dependency_config",
    } <= set(parameters(internals.PlanExecutionContextManager))
    assert {"retries", "marker_to_close", "step_dependency_config"} <= set(parameters(internals.InProcessExecutor))
    assert parameters(internals.ExecuteRunWithPlanIterable) == [
        "execution_plan",
        "iterator",
        "execution_context_manager",
    ]
    # PoolWait overrides these two: the claim of a step's slot, and how long the executor sleeps while one waits.
    assert parameters(internals.InstanceConcurrencyContext.claim) == [
        "self",
        "concurrency_key",
        "step_key",
        "step_priority",
    ]
    assert callable(internals.InstanceConcurrencyContext.interval_to_next_pending_claim_check)
    assert internals.pop_captured_interrupt() in (True, False)


def test_the_sensor_interval_reaches_every_sensor_and_leaves_it_what_it_was(tmp_path):
    """CLIP_ASSETS_SENSOR_INTERVAL_S: every sensor of the code location ticks at most that often, and is
    the same kind of sensor as before (a run-failure sensor, the automation sensor) doing the same thing."""
    here = {"data_dir": tmp_path / "data", "image_root": tmp_path}
    shipped = build_definitions(Settings(**here)).get_repository_def().sensor_defs
    quick = build_definitions(Settings(**here, sensor_interval_s=5)).get_repository_def().sensor_defs
    assert {s.minimum_interval_seconds for s in shipped} == {30}, "unset, each sensor keeps its own interval"
    assert {s.minimum_interval_seconds for s in quick} == {5}, (
        "dagster_internals.with_sensor_interval no longer sets a sensor's minimum interval"
    )
    assert [(s.name, type(s), s.default_status, s.targets) for s in quick] == [
        (s.name, type(s), s.default_status, s.targets) for s in shipped
    ]
    assert {type(s) for s in quick} >= {dg.RunStatusSensorDefinition, dg.AutomationConditionSensorDefinition}
