"""The run coordinator dagster.yaml names: Dagster's queued one, which the daemon builds as it starts.

So it is where the daemon's idle ticks are turned down to debug level (clip_assets.instance.daemon_logs):
the daemon's process runs none of the project's code otherwise, until it launches a run.
"""

from __future__ import annotations

import dagster as dg

from clip_assets.instance.daemon_logs import quiet_idle_ticks


class QueuedRunCoordinator(dg.QueuedRunCoordinator):
    """Dagster's QueuedRunCoordinator (runs wait in a queue the daemon launches from), with the
    daemon's idle ticks logged at debug level."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        quiet_idle_ticks()
