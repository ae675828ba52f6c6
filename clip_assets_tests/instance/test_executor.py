"""The code location's executor waiting for a pool slot, in this process against a real instance.

A real run of a job whose step is in the `gpu` pool (execute_job, the way `dagster asset materialize`
runs it), while another process's real run holds the slot: killed first, the dead holder is failed
and its slot freed before the step waits; alive, the waiting step names it and a SIGINT cancels the
waiting run. test_dead_runs.py does the same through `dagster asset materialize` with the embedding
step, and measures the waiting run's CPU use.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import dagster as dg
import pytest

from clip_assets.config.settings import REPO_ROOT
from clip_assets.instance.executor import in_process_executor
from clip_assets.instance.pool_slots import HOLDER_RUN_ID, REAPED_RUN_ID
from clip_assets_tests.support.scratch_instance import shipped_instance_yaml
from clip_assets_tests.support.slot_holders import SLOT_HOLDER, assert_slot_free_of, events_with, holds_slot


@dg.asset(pool="gpu")
def needs_the_gpu() -> int:
    return 1


def gpu_job() -> dg.JobDefinition:
    """The job, reconstructable (execute_job runs it from its module, as the CLI does)."""
    defs = dg.Definitions(assets=[needs_the_gpu], jobs=[dg.define_asset_job("gpu_job")], executor=in_process_executor)
    return defs.resolve_job_def("gpu_job")


@pytest.fixture
def home(tmp_path, instance_storage):
    """The repo's dagster.yaml, on SQLite and then on Postgres (pool slots are rows in the instance's storage)."""
    (tmp_path / "dagster.yaml").write_text(shipped_instance_yaml(tmp_path, instance_storage))
    return tmp_path


@pytest.fixture
def holder(home):
    """Another process's run that holds the `gpu` slot until it is killed, and that run."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.get_runs()  # the storage is created here, not by two processes at once
    process = subprocess.Popen(
        [sys.executable, "-c", SLOT_HOLDER],
        cwd=REPO_ROOT,
        env={**os.environ, "DAGSTER_HOME": str(home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            deadline = time.monotonic() + 120
            while not (runs := instance.get_runs()) or not holds_slot(instance, runs[0].run_id):
                assert process.poll() is None and time.monotonic() < deadline, "the holder never took the slot"
                time.sleep(0.1)
        yield process, runs[0]
    finally:
        process.kill()
        process.wait()


def rescue(instance: dg.DagsterInstance, held: dg.DagsterRun, done: threading.Event, after_s: float = 60) -> None:
    """Where the executor fails to end the wait, free the holder's slot after `after_s`, so the run ends and the
    test fails on its asserts instead of hanging."""
    if not done.wait(after_s):
        instance.event_log_storage.free_concurrency_slots_for_run(held.run_id)


def test_a_dead_holder_is_failed_and_its_slot_freed_before_the_step_waits(home, holder):
    process, held = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        done = threading.Event()
        threading.Thread(target=rescue, args=(instance, held, done), daemon=True).start()
        started = time.monotonic()
        result = dg.execute_job(dg.reconstructable(gpu_job), instance=instance)
        took = time.monotonic() - started
        done.set()
        assert result.success
        assert took < 20, f"the run took {took:.1f} s"  # it took the freed slot at Dagster's first checks
        assert instance.get_run_by_id(held.run_id).status == dg.DagsterRunStatus.FAILURE
        failure = instance.all_logs(held.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[-1]
        assert f"process {process.pid} is gone" in failure.message and result.run_id in failure.message
        assert_slot_free_of(instance, held.run_id)
        assert_slot_free_of(instance, result.run_id)
        (freed,) = events_with(instance, result.run_id, REAPED_RUN_ID)
        assert freed.dagster_event.engine_event_data.metadata["freed_pid"].value == process.pid
        assert not events_with(instance, result.run_id, HOLDER_RUN_ID)  # it never waited for the dead run


def test_a_waiting_step_names_the_live_holder_and_ctrl_c_cancels_its_run(home, holder):
    process, held = holder
    with dg.DagsterInstance.from_config(str(home)) as instance:
        told: list[dg.EventLogEntry] = []

        def interrupt_once_told():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                runs = [r for r in instance.get_runs() if r.run_id != held.run_id]
                told.extend(events_with(instance, runs[0].run_id, HOLDER_RUN_ID) if runs else [])
                if told:
                    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: caught by the run's handler, not pytest's
                    return
                time.sleep(0.1)
            rescue(instance, held, threading.Event(), after_s=0)

        watcher = threading.Thread(target=interrupt_once_told)
        watcher.start()
        result = dg.execute_job(dg.reconstructable(gpu_job), instance=instance, raise_on_error=False)
        watcher.join()
        assert told, "the waiting run never said who holds the slot"
        message = told[0].message
        assert held.run_id in message and f"pid {process.pid}" in message and f"kill {process.pid}" in message
        assert not result.success
        assert instance.get_run_by_id(result.run_id).status == dg.DagsterRunStatus.CANCELED
        assert_slot_free_of(instance, result.run_id)
        assert holds_slot(instance, held.run_id) and process.poll() is None  # the live holder is left alone
