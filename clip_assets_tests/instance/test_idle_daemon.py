"""An idle daemon says nothing at INFO (clip_assets.instance.daemon_logs): the sensors' idle ticks carry no
skip reason, and the daemon's lines for idle ticks are DEBUG records once the instance's run coordinator
is built, as the daemon builds it at its start. Real sensors, a real instance, Python's own logging."""

from __future__ import annotations

import logging

import dagster as dg
import pytest

from clip_assets.config.settings import REPO_ROOT
from clip_assets.definitions import build_definitions
from clip_assets.defs.classification.prompts import PROMPT_OBSERVATION_SENSOR
from clip_assets.instance.daemon_logs import IDLE_TICK_LINES
from clip_assets.instance.execution import observe
from clip_assets.instance.run_coordinator import QueuedRunCoordinator
from clip_assets_tests.support.dagster_ticks import tick


# What Dagster records for a tick whose sensor gave no reason (its daemon line is one of the idle ones).
NOTHING_SAID = (None, "Sensor function returned an empty result")


def evaluate(defs, instance, name):
    with dg.build_sensor_context(instance=instance, resources=defs.resources) as context:
        return defs.resolve_sensor_def(name).evaluate_tick(context)


def test_idle_sensor_ticks_have_nothing_to_say(settings, instance, tmp_path):
    (tmp_path / "empty").mkdir()
    defs = build_definitions(settings.model_copy(update={"image_root": tmp_path / "empty"}))
    assert observe(defs, instance, PROMPT_OBSERVATION_SENSOR) is not None  # the first tick records the files
    unchanged = evaluate(defs, instance, PROMPT_OBSERVATION_SENSOR)
    assert unchanged.skip_message in NOTHING_SAID and not unchanged.asset_events and not unchanged.run_requests
    no_new_folder = tick(defs, instance, None)
    assert no_new_folder.skip_message in NOTHING_SAID and not no_new_folder.run_requests
    # something to say is still said: a folder that cannot be a batch (see test_operations), a missing root
    missing = build_definitions(settings.model_copy(update={"image_root": tmp_path / "gone"}))
    assert "does not exist" in tick(missing, instance, None).skip_message


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def daemon_loggers():
    """The daemon's loggers with a handler that keeps what they let through; their levels restored after."""
    loggers = [logging.getLogger(name) for name in IDLE_TICK_LINES]
    levels = [logger.level for logger in loggers]
    lines = Lines()
    for logger in loggers:
        logger.addHandler(lines)
    yield loggers, lines
    for logger, level in zip(loggers, levels):
        logger.removeHandler(lines)
        logger.setLevel(level)


def test_the_daemons_idle_tick_lines_are_debug_once_its_run_coordinator_is_built(daemon_loggers, tmp_path):
    loggers, lines = daemon_loggers
    sensors, assets = loggers
    # the instance as dagster.yaml configures it; the daemon builds its run coordinator as it starts
    shipped = (REPO_ROOT / "dagster.yaml").read_text().replace(".dagster_home", str(tmp_path / ".dagster_home"))
    (tmp_path / "dagster.yaml").write_text(shipped)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)

    def tick_lines():
        sensors.info("Checking for new runs for sensor: image_batch_discovery")
        sensors.info("No run requests returned for image_batch_discovery, skipping")
        sensors.info("Sensor prompt_files_observation skipped: Sensor function returned an empty result")
        sensors.info("Sensor image_batch_discovery skipped: Image root /x does not exist.")  # something to say
        sensors.info("Launching run for image_batch_discovery")
        assets.info("Checking 7 assets/checks and 0 observable source assets for clip_assets_automation")
        assets.info("Prefetching asset records for 11 records.")
        assets.info("Done prefetching asset records.")
        assets.info("Tick produced 0 runs and 7 asset evaluations for evaluation ID 9")
        assets.info("Adding 7 asset evaluations for evaluation 9")
        assets.info("Submitting 0 runs for evaluation 9")
        assets.info("Tick produced 1 run and 7 asset evaluations for evaluation ID 10")
        assets.info("Submitting 1 run for evaluation 10")
        assets.info("Finished auto-materialization tick for clip_assets_automation")

    for logger in loggers:
        logger.setLevel(logging.INFO)  # `dagster dev`, as people run it
    tick_lines()
    assert [(r.levelname, r.getMessage()) for r in lines.records] == [
        ("INFO", "Sensor image_batch_discovery skipped: Image root /x does not exist."),
        ("INFO", "Launching run for image_batch_discovery"),
        ("INFO", "Tick produced 1 run and 7 asset evaluations for evaluation ID 10"),
        ("INFO", "Submitting 1 run for evaluation 10"),
    ]
    lines.records.clear()
    for logger in loggers:
        logger.setLevel(logging.DEBUG)  # `dagster dev --log-level debug` shows every tick
    tick_lines()
    assert len(lines.records) == 14
    assert sum(r.levelname == "DEBUG" for r in lines.records) == 10
