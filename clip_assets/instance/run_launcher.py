"""The run launcher for an instance on one machine (`dagster dev`): Dagster's default, plus worker health.

Dagster's run monitoring (`run_monitoring` in dagster.yaml) fails a STARTED run whose worker is gone,
but only when the run launcher can tell; the default launcher cannot. A run whose process was killed
(`dagster dev` SIGKILLed with its process group, the OOM killer) then stays STARTED forever and keeps
its pool slots, so every later embedding step waits for a `gpu` slot nobody will free.

This launcher answers from the process table. A run's worker is the process whose pid the run logged
first: "Started process for run (pid: N)" for a launched run, or the executor's "(pid: N)" for a run
executed inside a script. It is alive while that pid exists, is not a zombie, and (where /proc tells)
started before the run logged it, so a recycled pid is not taken for the worker. This holds where
the daemon sees the run workers' processes: runs launched from this machine, as with `dagster dev`.
A run on another host's code server, one whose executor logged another host name with its pid
(clip_assets.instance.executor logs it), or one that has not logged its pid yet, is reported running.
The same check (`check_worker`) lets a run waiting for a pool slot free the slots of a dead run without
the daemon (clip_assets.instance.pool_slots).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance, DagsterRun, DefaultRunLauncher

from clip_assets.instance.dagster_internals import GRPC_INFO_TAG, CheckRunHealthResult, WorkerStatus

# The run worker logs its pid among its first engine events.
FIRST_ENGINE_EVENTS = 10
# /proc gives boot time in whole seconds: a worker may seem to start this much after it logged its pid.
START_TIME_SLACK_S = 2.0
THIS_HOST = socket.gethostname()


@dataclass(frozen=True)
class RunProcess:
    pid: int
    logged_at: float  # when the run logged the pid (the process had started by then)
    host: str | None = None  # the host name the run logged with a pid; None where it logged none


def run_process(instance: DagsterInstance, run_id: str) -> RunProcess | None:
    """The process that runs `run_id`: the pid of its first engine event that carries one, and the host
    name of the first that carries one."""
    records = instance.get_records_for_run(
        run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=FIRST_ENGINE_EVENTS
    ).records
    found, host = None, None
    for record in records:
        event = record.event_log_entry.dagster_event
        metadata = (getattr(event.event_specific_data, "metadata", None) or {}) if event else {}
        pid = metadata.get("pid")
        if found is None and pid is not None and str(pid.value).isdigit():
            found = (int(pid.value), record.event_log_entry.timestamp)
        if host is None and metadata.get("host") is not None:
            host = str(metadata["host"].value)
    return RunProcess(*found, host=host) if found else None


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def process_is_alive(process: RunProcess) -> bool:
    """The pid exists, is not a zombie, and is not a newer process that was given the same number."""
    try:
        os.kill(process.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        stat = Path(f"/proc/{process.pid}/stat").read_text()
        boot = _boot_time()
    except OSError:
        return True  # no /proc (macOS): the pid exists, that is all we know
    state, *rest = stat[stat.rindex(")") + 2 :].split()
    if state in ("Z", "X"):
        return False
    started = boot + int(rest[18]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5): starttime
    return started <= process.logged_at + START_TIME_SLACK_S


def _launched_on_this_machine(run: DagsterRun) -> bool:
    info = run.tags.get(GRPC_INFO_TAG)
    if not info:
        return True  # executed in a script's own process, or launched some other way on this instance
    grpc = json.loads(info)
    host = grpc.get("host")
    if grpc.get("socket") or not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class WorkerCheck:
    alive: bool | None  # None: this machine cannot tell (another host, or no pid logged yet)
    process: RunProcess | None
    reason: str


def check_worker(instance: DagsterInstance, run: DagsterRun) -> WorkerCheck:
    """Whether the process that runs `run` is alive, as far as this machine can tell."""
    if not _launched_on_this_machine(run):
        return WorkerCheck(None, None, "run worker on another host: not checked")
    process = run_process(instance, run.run_id)
    if process is None:
        return WorkerCheck(None, None, "run worker has not logged its pid yet")
    if process.host not in (None, THIS_HOST):
        return WorkerCheck(None, process, f"run worker process {process.pid} is on host {process.host}: not checked")
    if process_is_alive(process):
        return WorkerCheck(True, process, f"run worker process {process.pid} is alive")
    return WorkerCheck(False, process, f"run worker process {process.pid} is gone (killed, or its machine restarted)")


class LocalRunLauncher(DefaultRunLauncher):
    """DefaultRunLauncher that tells run monitoring whether a run's worker process is still alive."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        check = check_worker(self._instance, run)
        return CheckRunHealthResult(WorkerStatus.FAILED if check.alive is False else WorkerStatus.RUNNING, check.reason)
