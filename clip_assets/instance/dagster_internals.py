"""The few things this project needs from Dagster that Dagster does not export publicly.

Every private `dagster._...` import of the package is here and nowhere else, each with what it is
for; clip_assets_tests/instance/test_dagster_internals.py fails loudly, naming the import, when a
Dagster release moves or changes one of them (dagster is pinned in pyproject.toml: upgrade, run that
test, then fix this module alone).
"""

from __future__ import annotations

import copy

from dagster import Definitions

# A runless observation's data version: AssetObservation takes no data_version argument, so the
# prompt, labels and captions observations carry it as these tags (what ObserveResult does inside).
from dagster._core.definitions.data_version import DATA_VERSION_IS_USER_PROVIDED_TAG, DATA_VERSION_TAG

# The substrings a partition key may not contain (clip_assets.ingest.batch_discovery keeps its own
# copy, so the library layer does not import Dagster; a test keeps the two equal).
from dagster._core.definitions.partitions.utils.base import INVALID_PARTITION_SUBSTRINGS

# The code location's executor (clip_assets.instance.executor): Dagster's in-process executor with our
# own wait for pool slots. Dagster builds that executor's run from these pieces and offers no hook for
# the wait (InstanceConcurrencyContext), so the executor rebuilds its execute() from them; an engine
# event's data (EngineEventData) is the type the executor's events and the wait's messages carry.
from dagster._core.events import EngineEventData
from dagster._core.execution.api import ExecuteRunWithPlanIterable
from dagster._core.execution.context_creation_job import PlanExecutionContextManager
from dagster._core.execution.plan.execute_plan import inner_plan_execution_iterator
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
from dagster._core.executor.in_process import InProcessExecutor

# The run launcher's health check for run monitoring (clip_assets.instance.run_launcher): the
# result type Dagster expects, and the tag that says a run went to a code server on another host.
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus

# A run over a range of partitions (what a backfill run covers): RunRequest and execute_in_process
# take a single partition_key, the range only as these two tags. WILL_RETRY_TAG: set on a failed run,
# "true" when run_retries (dagster.yaml) will launch a retry of it.
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    GRPC_INFO_TAG,
    WILL_RETRY_TAG,
)

# The code location's Definitions with its sensors replaced (with_sensor_interval): a Definitions is a
# record whose public methods replace assets only (map_asset_specs), not sensors.
from dagster._record import copy as copy_record

# Ctrl-C and SIGTERM during a run only set a flag (Dagster's signal handler while a run executes),
# which Dagster reads when a step starts: the pool wait reads and clears it too.
from dagster._utils.interrupts import pop_captured_interrupt


def partition_range_tags(first: str, last: str) -> dict[str, str]:
    """The tags of a run over the partitions from `first` to `last`, as a backfill run carries them."""
    return {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}


def partition_range(tags: dict[str, str]) -> tuple[str, str] | None:
    """(first, last) of a run over a range of partitions, from its tags; None for any other run."""
    first, last = tags.get(ASSET_PARTITION_RANGE_START_TAG), tags.get(ASSET_PARTITION_RANGE_END_TAG)
    return (first, last) if first and last else None


def data_version_tags(version: str) -> dict[str, str]:
    """The tags that give a runless observation its data version."""
    return {DATA_VERSION_TAG: version, DATA_VERSION_IS_USER_PROVIDED_TAG: "true"}


def with_sensor_interval(defs: Definitions, seconds: int) -> Definitions:
    """`defs` with every sensor ticking at most every `seconds` (CLIP_ASSETS_SENSOR_INTERVAL_S). A sensor
    keeps its minimum interval in `_min_interval`, and no public method copies it with another one
    (with_attributes takes jobs and metadata only, and makes a run-failure or automation sensor a plain
    one), so each sensor is a shallow copy of itself, its class and evaluation kept, with that replaced."""

    def every(sensor):
        copied = copy.copy(sensor)
        copied._min_interval = seconds
        return copied

    return copy_record(defs, sensors=[every(sensor) for sensor in defs.sensors or []])


__all__ = [
    "ASSET_PARTITION_RANGE_END_TAG",
    "ASSET_PARTITION_RANGE_START_TAG",
    "GRPC_INFO_TAG",
    "INVALID_PARTITION_SUBSTRINGS",
    "CheckRunHealthResult",
    "EngineEventData",
    "ExecuteRunWithPlanIterable",
    "InProcessExecutor",
    "InstanceConcurrencyContext",
    "PlanExecutionContextManager",
    "WILL_RETRY_TAG",
    "WorkerStatus",
    "data_version_tags",
    "inner_plan_execution_iterator",
    "partition_range",
    "partition_range_tags",
    "pop_captured_interrupt",
    "with_sensor_interval",
]
