"""The run launcher's worker health check, against a real instance and a real run process killed with SIGKILL.

The whole recovery (run monitoring failing the run, the slot freed, the retry) runs in
test_dagster_dev.py with the real daemon; this checks the answer the daemon acts on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import dagster as dg
import pytest

from clip_assets.config.settings import REPO_ROOT
from clip_assets.instance.dagster_internals import WorkerStatus
from clip_assets.instance.run_launcher import LocalRunLauncher, RunProcess, process_is_alive, run_process

INSTANCE_YAML = """
storage:
  sqlite:
    base_dir: {home}/storage
run_launcher:
  module: clip_assets.instance.run_launcher
  class: LocalRunLauncher
telemetry:
  enabled: false
"""

# A run executed inside a script's own process, which then hangs in its step until killed.
HANGING_RUN = textwrap.dedent(
    """
    import time
    import dagster as dg

    @dg.asset
    def slow():
        time.sleep(600)

    dg.materialize([slow], instance=dg.DagsterInstance.get())
    """
)


@pytest.fixture
def home(tmp_path):
    (tmp_path / "dagster.yaml").write_text(INSTANCE_YAML.format(home=tmp_path))
    return tmp_path


def test_a_killed_run_process_is_reported_failed(home):
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-c", HANGING_RUN], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        instance = dg.DagsterInstance.from_config(str(home))
        launcher = instance.run_launcher
        assert isinstance(launcher, LocalRunLauncher) and launcher.supports_check_run_worker_health

        def started_run():
            runs = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
            return runs[0] if runs and run_process(instance, runs[0].run_id) else None

        deadline = time.monotonic() + 180
        while (run := started_run()) is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the run never started"
            time.sleep(0.2)
        assert run_process(instance, run.run_id).pid == proc.pid
        health = launcher.check_run_worker_health(run)
        assert health.status == WorkerStatus.RUNNING, health

        proc.send_signal(signal.SIGKILL)
        proc.wait()
        health = launcher.check_run_worker_health(run)
        assert health.status == WorkerStatus.FAILED, health
        assert f"process {proc.pid} is gone" in health.msg
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED  # until monitoring acts
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_recycled_pid_is_not_taken_for_the_run_worker():
    before = time.time()
    proc = subprocess.Popen(["sleep", "60"])
    try:
        assert process_is_alive(RunProcess(proc.pid, logged_at=time.time()))
        # The same pid logged a minute before this process existed: a dead run's number, given again.
        assert not process_is_alive(RunProcess(proc.pid, logged_at=before - 60))
    finally:
        proc.kill()
        proc.wait()
    assert not process_is_alive(RunProcess(proc.pid, logged_at=time.time()))
