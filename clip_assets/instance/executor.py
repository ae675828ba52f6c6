"""The code location's executor: Dagster's in-process executor, with a wait for pool slots that frees
what dead runs held, says who holds the slot, sleeps, and stops on Ctrl-C.

Steps run in the run's own process (clip_assets.definitions says why). How Dagster's in-process
executor (1.13) waits for a slot of a pool (`gpu`, `duckdb_writer`), and what this one changes:

- Its loop sleeps `InstanceConcurrencyContext.interval_to_next_pending_claim_check()`, which is
  `min(0, ...)`: never positive, so a waiting run spins a whole core. Here it is WAKE_S.
- Ctrl-C and SIGTERM during a run only set a flag that Dagster reads when a step starts, so a waiting
  run ignores both until it gets its slot. Here each wake-up reads the flag, and a set flag cancels the
  run (CANCELED, not FAILURE: run retries leave it alone) and withdraws its place in the queue.
- A slot held by a run whose process died stays held until the daemon's run monitoring frees it, so
  without `dagster dev` it is held for ever. Here, once a step finds its pool full, and every LOOK_S
  while it waits, the runs in the pool are checked against the process table
  (clip_assets.instance.pool_slots): a dead one is failed and its slots freed, a live holder is named
  in the run log (run, step, pid, since when, how to free it), again whenever the holders change.

The executor also logs its host name with its pid, so a run on another machine that shares the
instance's storage is never taken for a dead one here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import dagster as dg

from clip_assets.instance.dagster_internals import (
    EngineEventData,
    ExecuteRunWithPlanIterable,
    InProcessExecutor,
    InstanceConcurrencyContext,
    PlanExecutionContextManager,
    inner_plan_execution_iterator,
    pop_captured_interrupt,
)
from clip_assets.instance.pool_slots import (
    HOLDER_RUN_ID,
    REAPED_RUN_ID,
    describe_wait,
    free_slots_of_dead_runs,
    slot_holders,
)
from clip_assets.instance.run_launcher import THIS_HOST

# A waiting run wakes this often to read the interrupt flag; Dagster's claim paces its own queries.
WAKE_S = 0.5
# How often a waiting step checks the runs in its pool for dead ones and for a change of holders.
LOOK_S = 5.0


@dataclass
class _Wait:
    pool: str
    started: float
    next_look: float
    told: tuple | None = None  # the holders last named in the log


class PoolWait(InstanceConcurrencyContext):
    """Dagster's claims on pool slots (InstanceConcurrencyContext), with the waiting described above."""

    def __init__(self, job_context):
        super().__init__(job_context.instance, job_context.dagster_run)
        self._job_context = job_context
        self._waits: dict[str, _Wait] = {}

    def claim(self, concurrency_key: str, step_key: str, step_priority: int = 0) -> bool:
        if pop_captured_interrupt():
            waiting = f"while step {step_key} waited for a slot in pool {concurrency_key}"
            self._cancel(f"Ctrl-C or SIGTERM {waiting if step_key in self._waits else f'before step {step_key}'}")
        if super().claim(concurrency_key, step_key, step_priority):
            wait = self._waits.pop(step_key, None)
            if wait:
                self._log(
                    step_key,
                    f"Step {step_key} got its slot in pool {wait.pool} after waiting "
                    f"{time.monotonic() - wait.started:.0f} s.",
                    {"pool": wait.pool},
                )
            return True
        now = time.monotonic()
        wait = self._waits.setdefault(step_key, _Wait(concurrency_key, started=now, next_look=now))
        if now >= wait.next_look:
            wait.next_look = now + LOOK_S
            self._look(step_key, wait)
        return False

    def _cancel(self, why: str):
        """Stop the run as canceled (a person asked for it, so run retries leave it alone), not failed."""
        instance = self._job_context.instance
        run = instance.get_run_by_id(self._job_context.run_id)
        if run and not run.is_finished and run.status != dg.DagsterRunStatus.CANCELING:
            instance.report_run_canceling(run, message=f"Canceling the run: {why}.")
        raise dg.DagsterExecutionInterruptedError(why)

    def interval_to_next_pending_claim_check(self) -> float:
        return WAKE_S if self.has_pending_claims() else 0.0

    def _look(self, step_key: str, wait: _Wait) -> None:
        instance, run_id = self._job_context.instance, self._job_context.run_id
        freed = free_slots_of_dead_runs(instance, wait.pool, run_id)
        for run in freed:
            self._log(
                step_key,
                run.message,
                {"pool": wait.pool, REAPED_RUN_ID: run.run_id, **({"freed_pid": run.pid} if run.pid else {})},
            )
        if freed:
            return  # the step takes the freed slot at Dagster's next check (1 to 15 s); or the next look says why not
        holders = slot_holders(instance, wait.pool, but=run_id)
        told = tuple((h.run_id, h.step_key, h.status) for h in holders)
        if told == wait.told:
            return
        wait.told = told
        limit = instance.event_log_storage.get_concurrency_info(wait.pool).limit
        metadata = {"pool": wait.pool}
        if holders:
            first = holders[0]
            metadata[HOLDER_RUN_ID] = first.run_id
            if first.worker and first.worker.process:
                metadata["holder_pid"] = first.worker.process.pid
            if first.since:
                metadata["held_since"] = first.since.isoformat()
        self._log(step_key, describe_wait(step_key, wait.pool, holders, limit, LOOK_S), metadata)

    def _log(self, step_key: str, message: str, metadata: dict) -> None:
        step = self._job_context.execution_plan.get_step_by_key(step_key)
        dg.DagsterEvent.engine_event(self._job_context.for_step(step), message, EngineEventData(metadata=metadata))


def _execute_steps(job_context, execution_plan):
    with PoolWait(job_context) as pool_wait:
        yield from inner_plan_execution_iterator(job_context, execution_plan, pool_wait)


class PoolWaitingInProcessExecutor(InProcessExecutor):
    """InProcessExecutor.execute (Dagster 1.13), its steps run with PoolWait."""

    def execute(self, plan_context, execution_plan):
        pid = os.getpid()
        steps = execution_plan.step_keys_to_execute
        in_process = EngineEventData.in_process(pid, steps)
        yield dg.DagsterEvent.engine_event(
            plan_context,
            f"Executing steps in process (pid: {pid})",
            EngineEventData(metadata={**in_process.metadata, "host": dg.MetadataValue.text(THIS_HOST)}),
        )
        started = time.perf_counter()
        yield from ExecuteRunWithPlanIterable(
            execution_plan=plan_context.execution_plan,
            iterator=_execute_steps,
            execution_context_manager=PlanExecutionContextManager(
                job=plan_context.job,
                retry_mode=plan_context.retry_mode,
                execution_plan=plan_context.execution_plan,
                run_config=plan_context.run_config,
                dagster_run=plan_context.dagster_run,
                instance=plan_context.instance,
                raise_on_error=plan_context.raise_on_error,
                output_capture=plan_context.output_capture,
                step_dependency_config=self.step_dependency_config,
            ),
        )
        yield dg.DagsterEvent.engine_event(
            plan_context, f"Finished steps in process (pid: {pid}) in {time.perf_counter() - started:.1f} s", in_process
        )


@dg.executor(name="in_process", config_schema=dg.in_process_executor.config_schema)
def in_process_executor(init_context) -> PoolWaitingInProcessExecutor:
    """Dagster's in_process executor, same config (`execution: in_process: ...`), waiting as above."""
    dagsters = dg.in_process_executor.executor_creation_fn(init_context)
    return PoolWaitingInProcessExecutor(
        retries=dagsters.retries,
        marker_to_close=dagsters.marker_to_close,
        step_dependency_config=dagsters.step_dependency_config,
    )
