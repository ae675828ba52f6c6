"""Pool slots in tests: a live run of another process that holds the `gpu` slot, and what the instance
says about a pool's slots and a run's engine events."""

from __future__ import annotations

import textwrap

import dagster as dg

GPU = "gpu"

# A real run of another job, in its own process (`python -c`, DAGSTER_HOME set), that holds the `gpu`
# slot until it is killed.
SLOT_HOLDER = textwrap.dedent(
    """
    import time
    import dagster as dg

    @dg.asset(pool="gpu")
    def holds_the_gpu():
        time.sleep(900)

    dg.materialize([holds_the_gpu], instance=dg.DagsterInstance.get())
    """
)


def holds_slot(instance: dg.DagsterInstance, run_id: str, pool: str = GPU) -> bool:
    return run_id in {slot.run_id for slot in instance.event_log_storage.get_concurrency_info(pool).claimed_slots}


def assert_slot_free_of(instance: dg.DagsterInstance, run_id: str, pool: str = GPU) -> None:
    """The run holds no slot of the pool and has no step queued for one."""
    info = instance.event_log_storage.get_concurrency_info(pool)
    assert run_id not in {s.run_id for s in info.claimed_slots}, info
    assert run_id not in {p.run_id for p in info.pending_steps}, info


def events_with(instance: dg.DagsterInstance, run_id: str, key: str) -> list[dg.EventLogEntry]:
    """The run's engine events whose metadata has `key`."""
    return [
        e
        for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
        if key in e.dagster_event.engine_event_data.metadata
    ]
