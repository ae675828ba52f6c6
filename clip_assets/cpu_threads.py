"""The one policy for how torch uses the CPU's cores, decided here for every process of the project.

torch's CPU kernels run on OpenMP threads (libgomp in torch's wheels). By default an idle OpenMP
thread spins, waiting for the next parallel region, instead of sleeping; alone on a machine that
saves a wake-up, but where several torch processes share the cores (the demo's training beside a
Dagster run, up to four runs at once, two encoders on one machine) the spinning threads take the
cores from the threads with work to do, and every process runs many times slower. So the OpenMP
runtime is told to let its idle threads sleep (OMP_WAIT_POLICY=PASSIVE), which costs little alone
and keeps several processes at their fair share (benchmarks/cpu_under_load.py measures both).

The variable must be set before the OpenMP runtime starts, i.e. before torch is imported: the
package's `__init__` calls `prefer_passive_waiting` first thing, so any process that imports
clip_assets before torch gets it. A value the user set (OMP_WAIT_POLICY=ACTIVE, or
GOMP_SPINCOUNT) is kept. How many threads a step uses stays each step's own choice (the embedding
engine gives torch the cores its decode workers leave: clip_assets.embedding.engine.model_threads).
"""

from __future__ import annotations

import os

WAIT_POLICY = "OMP_WAIT_POLICY"
PASSIVE = "PASSIVE"


def prefer_passive_waiting(environ: dict | None = None) -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user chose a wait policy or spin count themselves."""
    environ = os.environ if environ is None else environ
    if WAIT_POLICY not in environ and "GOMP_SPINCOUNT" not in environ:
        environ[WAIT_POLICY] = PASSIVE
