"""Who holds a pool's slots, and freeing the slots of runs whose process died, without the daemon.

A step in a pool (`gpu`, `duckdb_writer`: dagster.yaml) waits for a free slot. A run killed with
SIGKILL (the OOM killer, a reboot) keeps its slots and stays STARTED: no code of its own frees them,
and only the daemon's run monitoring looks (`dagster dev`), not `dagster asset materialize`. So a
waiting step (clip_assets.instance.executor) checks the runs in its pool with the run launcher's
process-table check (clip_assets.instance.run_launcher.check_worker): a run whose process is gone is
marked failed and its slots freed. A live holder is described: run, step, pid, since when, how to
free the slot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from dagster import DagsterInstance, DagsterRunStatus

from clip_assets.instance.run_launcher import WorkerCheck, check_worker

# Metadata keys of the waiting run's engine events: the run it waits for, and a dead run it freed.
HOLDER_RUN_ID = "holder_run_id"
REAPED_RUN_ID = "freed_run_id"


@dataclass(frozen=True)
class SlotHolder:
    run_id: str
    step_key: str
    since: datetime | None  # when the slot was given to the step
    status: DagsterRunStatus | None  # None: no such run any more
    worker: WorkerCheck | None


@dataclass(frozen=True)
class FreedRun:
    run_id: str
    pid: int | None
    message: str


def _runs_in_pool(instance: DagsterInstance, pool: str) -> tuple[set[tuple[str, str]], dict, set[str]]:
    """(run, step) pairs holding a slot, when each was given its slot, and every run holding or queued."""
    info = instance.event_log_storage.get_concurrency_info(pool)
    given = {(p.run_id, p.step_key): p.assigned_timestamp for p in info.pending_steps if p.assigned_timestamp}
    held = {(s.run_id, s.step_key) for s in info.claimed_slots} | set(given)
    queued = {p.run_id for p in info.pending_steps}
    return held, given, {run_id for run_id, _ in held} | queued


def slot_holders(instance: DagsterInstance, pool: str, but: str) -> list[SlotHolder]:
    """The steps of other runs than `but` that hold a slot of `pool`, oldest first."""
    held, given, _ = _runs_in_pool(instance, pool)
    holders = []
    for run_id, step_key in held:
        if run_id == but:
            continue
        run = instance.get_run_by_id(run_id)
        worker = check_worker(instance, run) if run else None
        holders.append(SlotHolder(run_id, step_key, given.get((run_id, step_key)), run.status if run else None, worker))
    return sorted(holders, key=lambda h: h.since.timestamp() if h.since else 0.0)


def free_slots_of_dead_runs(instance: DagsterInstance, pool: str, waiting_run_id: str) -> list[FreedRun]:
    """Fail every run holding or queued for a slot of `pool` whose process is gone from this machine, and
    free its slots (in every pool); also free the slots of runs that no longer exist."""
    _, _, run_ids = _runs_in_pool(instance, pool)
    freed = []
    for run_id in sorted(run_ids - {waiting_run_id}):
        run = instance.get_run_by_id(run_id)
        if run is None:
            instance.event_log_storage.free_concurrency_slots_for_run(run_id)
            freed.append(FreedRun(run_id, None, f"Freed the pool slots of run {run_id}, which no longer exists."))
            continue
        worker = check_worker(instance, run)
        if worker.alive is not False:
            continue
        pid = worker.process.pid if worker.process else None
        if not run.is_finished:
            instance.report_run_failed(
                run, f"{worker.reason}; failed by run {waiting_run_id}, which waited for its slot in pool {pool}."
            )
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
        freed.append(
            FreedRun(
                run_id,
                pid,
                f"Run {run_id} held pool {pool}, but its {worker.reason}: "
                f"{'marked failed, and ' if not run.is_finished else ''}its slots freed.",
            )
        )
    return freed


def _when(since: datetime | None) -> str:
    if since is None:
        return "since an unknown time"
    ago = max(0, int(time.time() - since.timestamp()))
    return f"since {since.astimezone().strftime('%Y-%m-%d %H:%M:%S %Z')} ({ago} s ago)"


def _holder_line(holder: SlotHolder, look_s: float) -> str:
    head = f"run {holder.run_id} (step {holder.step_key}"
    if holder.status is None:
        return f"{head}; no such run any more) {_when(holder.since)}: freed at the next look, in {look_s:.0f} s"
    worker = holder.worker
    if worker and worker.alive and worker.process:
        pid = worker.process.pid
        return (
            f"{head}, pid {pid} on this machine, {holder.status.value}) {_when(holder.since)}; to free the slot "
            f"sooner, stop that run: Ctrl-C in its terminal, or `kill {pid}` (a run whose process is gone is "
            f"failed and its slots freed here within {look_s:.0f} s)"
        )
    why = worker.reason if worker else "its process is not known"
    return (
        f"{head}, {holder.status.value}; {why}) {_when(holder.since)}; to free the slot, stop that run where it "
        f"runs, or open it in the UI and use Terminate or 'Free concurrency slots'"
    )


def describe_wait(step_key: str, pool: str, holders: list[SlotHolder], limit: int | None, look_s: float) -> str:
    """What a step waiting for a slot of `pool` waits for, and how to end the wait."""
    head = f"Step {step_key} waits for a slot in pool {pool} (limit {limit if limit is not None else 'none'})"
    if holders:
        return f"{head}, held by " + "; and by ".join(_holder_line(h, look_s) for h in holders) + "."
    if limit == 0:
        return f"{head}: no step of this pool can run until it is raised (`dagster instance concurrency set {pool} 1`)."
    return f"{head}: no other run holds one now; the step takes the next free slot in priority order."
