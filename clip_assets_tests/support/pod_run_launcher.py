"""A run launcher for tests that stands in for Kubernetes's: each run a process of its own, in a folder of its own.

Dagster's `K8sRunLauncher` starts each run as a Kubernetes job whose pod runs `dagster api execute_run
<args>`, with the instance config (a ConfigMap) at DAGSTER_HOME and the settings from ConfigMaps and
Secrets in its environment, on a disk it shares with no other pod. This launcher does the same on one
machine: `dagster api execute_run` (the command K8sRunLauncher builds, from the run's code origin) in a
new process whose working directory, DAGSTER_HOME (a copy of `instance_config_file`), TMPDIR and
CLIP_ASSETS_CACHE_DIR are new folders under `pods_dir`, made for that run alone; everything else in its
environment is the launching daemon's, as a pod's is its ConfigMaps'. So a run worker shares nothing
with the daemon, the code server or another run but what the instance config and the settings point at
(the Postgres instance, the bucket).

Run monitoring asks it whether a run's worker is alive as LocalRunLauncher does (the pid the run
logged, on this machine's process table: clip_assets.instance.run_launcher.check_worker), so a worker
killed with SIGKILL is failed by the daemon and retried, as a dead pod is.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.launcher.base import CheckRunHealthResult, LaunchRunContext, RunLauncher, WorkerStatus
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import ConfigurableClass, ConfigurableClassData

from clip_assets.instance.run_launcher import check_worker, run_process

# What a pod is told about its own machine: never the launching process's.
POD_LOCAL = ("DAGSTER_HOME", "TMPDIR", "TEMP", "TMP", "CLIP_ASSETS_CACHE_DIR")
_pods = itertools.count(1)


def pod_folders(pods_dir: Path) -> list[Path]:
    """The folder of every run worker launched so far, oldest first."""
    return sorted((p for p in pods_dir.glob("run-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))


def _die_with_daemon() -> None:
    """In the worker before it starts: SIGKILL when the daemon that launched it dies (tests leave no workers)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class PodRunLauncher(RunLauncher, ConfigurableClass):
    def __init__(self, pods_dir: str, instance_config_file: str, inst_data: ConfigurableClassData | None = None):
        self._inst_data = inst_data
        self.pods_dir = Path(pods_dir)
        self.instance_config_file = Path(instance_config_file)
        self._workers: dict[str, subprocess.Popen] = {}
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict:
        return {"pods_dir": dg.Field(str), "instance_config_file": dg.Field(str)}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]) -> PodRunLauncher:
        return cls(inst_data=inst_data, **config_value)

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        # The command K8sRunLauncher puts in the pod, except that the pod reads the instance from its own
        # DAGSTER_HOME rather than from a reference to the launching daemon's.
        args = ExecuteRunArgs(
            job_origin=context.job_code_origin, run_id=run.run_id, instance_ref=None, set_exit_code_on_failure=True
        ).get_command_args()
        pod = self.pods_dir / f"run-{next(_pods)}-{run.run_id[:8]}"
        home, tmp, cache, work = (pod / name for name in ("dagster_home", "tmp", "cache", "work"))
        for folder in (home, tmp, cache, work):
            folder.mkdir(parents=True)
        shutil.copyfile(self.instance_config_file, home / "dagster.yaml")
        env = {k: v for k, v in os.environ.items() if k not in POD_LOCAL}
        env.update({"DAGSTER_HOME": str(home), "TMPDIR": str(tmp), "CLIP_ASSETS_CACHE_DIR": str(cache)})
        with open(pod / "worker.log", "wb") as log:
            self._workers[run.run_id] = subprocess.Popen(
                list(args), cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,  # in the daemon's process group
                preexec_fn=_die_with_daemon,  # noqa: PLW1509 (one prctl before exec)
            )
        self._instance.report_engine_event(
            f"Run worker started in its own folder {pod} (pid {self._workers[run.run_id].pid})", run, cls=self.__class__
        )

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        worker = self._workers.get(run.run_id)
        if worker is not None:
            worker.poll()  # reaps a dead worker, which would otherwise stay a zombie of this process
        check = check_worker(self._instance, run)
        return CheckRunHealthResult(WorkerStatus.FAILED if check.alive is False else WorkerStatus.RUNNING, check.reason)

    def terminate(self, run_id: str) -> bool:
        process = run_process(self._instance, run_id)
        if process is None:
            return False
        try:
            os.kill(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        return True
