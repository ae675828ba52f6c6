"""The daemon's idle ticks at debug level: `dagster dev` printed about 27 lines a minute while nothing happened.

Dagster's daemon logs every sensor tick and every automation tick at INFO, two to four lines each,
whether the tick did anything or not ("Checking for new runs for sensor: ...", "No run requests
returned for ..., skipping", "Prefetching asset records ...", "Finished auto-materialization tick
..."): with this code location's sensors on 30 s intervals, a screenful every two minutes that hides
the lines that matter. The sensors themselves say nothing on an idle tick (no skip reason: an
unchanged file, no new folder), and `quiet_idle_ticks` turns the daemon's lines for such ticks into
DEBUG records, dropped unless the daemon logs at debug level (`dagster dev --log-level debug`). A
tick that does something keeps its INFO lines: a run launched or requested by automation, a skip
reason of the project's own (the image root or the prompts folder missing, a folder that cannot be a
batch), an observation recorded (the sensor's own log line), a failure.

Until it launches a run, the daemon's process runs the project's code only as the run coordinator
dagster.yaml names (clip_assets.instance.run_coordinator), which the daemon builds as it starts: that
is where the filter is installed. Dagster's own QueuedRunCoordinator in its place (as in
deploy/dagster.k8s.yaml) brings back the INFO lines, nothing else.
"""

from __future__ import annotations

import logging
import re

# Each daemon's logger, and the lines its idle ticks write (matched at the start of the message).
IDLE_TICK_LINES: dict[str, tuple[str, ...]] = {
    "dagster.daemon.SensorDaemon": (
        r"Checking for new runs for sensor: ",
        r"No run requests returned for \S+, skipping$",
        r"Sensor \S+ skipped: Sensor function returned an empty result$",
    ),
    "dagster.daemon.AssetDaemon": (
        r"Checking \d+ assets/checks and \d+ observable source",
        r"Prefetching asset records for \d+ records\.$",
        r"Done prefetching asset records\.$",
        r"Tick produced 0 runs and ",
        r"Adding \d+ asset evaluations for evaluation ",
        r"Submitting 0 runs for evaluation ",
        r"Finished auto-materialization tick",
    ),
}


class IdleTickFilter(logging.Filter):
    """Makes the lines of an idle tick DEBUG records: kept only where the logger logs at debug level."""

    def __init__(self, logger_name: str, patterns: tuple[str, ...]):
        super().__init__(logger_name)
        self.logger = logging.getLogger(logger_name)
        self.idle = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not self.idle.match(record.getMessage()):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return self.logger.isEnabledFor(logging.DEBUG)


_FILTERS = {name: IdleTickFilter(name, patterns) for name, patterns in IDLE_TICK_LINES.items()}


def quiet_idle_ticks() -> None:
    """Install the filters on the daemon's loggers (idempotent: a logger keeps one copy of a filter)."""
    for name, idle in _FILTERS.items():
        logging.getLogger(name).addFilter(idle)
