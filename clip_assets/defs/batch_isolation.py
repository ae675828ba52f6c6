"""One bad batch must not stop the good ones.

A run covering several batches (a backfill range, the discovery sensor's groups, a prompt edit's
re-run) does each batch's work in turn. `each_batch` does them all: a batch that fails is logged
with its reason and the others go on, so their files are written; the step then fails naming every
batch that failed. Dagster records a step's partitions all together, so the
`split_failed_batch_runs` sensor (clip_assets.defs.ingest.sensors) then runs each batch of the failed
range on its own: the good ones finish from what is already on disk, and the bad one fails alone,
with its reason on its own partition.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import dagster as dg

from clip_assets.defs.failures import reason
from clip_assets.defs.metadata import table

T = TypeVar("T")


def each_batch(context: dg.AssetExecutionContext, work: Callable[[str], T]) -> dict[str, T]:
    """`work(batch)` for every batch of the step, in order; their results when every batch succeeded.

    A run of one batch fails as that batch's work failed. A run of several fails after the others
    are done, with a description and a table that name each failed batch and why.
    """
    batches = context.partition_keys
    if len(batches) == 1:
        return {batches[0]: work(batches[0])}
    done: dict[str, T] = {}
    failed: dict[str, str] = {}
    for batch in batches:
        try:
            done[batch] = work(batch)
        except Exception as exc:  # a run's termination is a BaseException and still stops everything
            failed[batch] = reason(exc)
            context.log.exception(f"{batch} failed ({failed[batch]}); the other batches of this run go on")
    if failed:
        raise dg.Failure(
            description=f"{len(failed)} of {len(batches)} batches failed, the other {len(done)} were done: "
            + "; ".join(f"{b}: {r}" for b, r in list(failed.items())[:5])
            + ". Each batch of this run is re-run on its own by the split_failed_batch_runs sensor.",
            metadata={
                "failed_batches": table([{"batch": b, "reason": r[:500]} for b, r in failed.items()],
                                        {"batch": "string", "reason": "string"}),
                "done_batches": len(done),
            },
        )
    return done


def one_batch_data_version(versions: dict[str, str]) -> dg.DataVersion | None:
    """The step's data version: the batch's own where the run had one batch. Dagster takes one data
    version per step, so a multi-batch run's partitions get Dagster's computed one."""
    return dg.DataVersion(next(iter(versions.values()))) if len(versions) == 1 else None
