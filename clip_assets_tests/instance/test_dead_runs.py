"""A command-line run that died must not block the ones after it: no daemon, the repo's dagster.yaml.

`dagster asset materialize` runs as the README and the benchmarks use it, in a temp DAGSTER_HOME with
the shipped pools (`gpu` of one). The first test SIGKILLs an embedding run (as the OOM killer or a
reboot would) while it holds the `gpu` slot, and the next embedding run must fail it, free its slot
and finish. The second holds the slot with a live run and checks the waiting run: it names the
holder, sleeps instead of spinning a core, and stops at once on Ctrl-C (SIGINT); then the holder is
SIGKILLed while another run waits, and that run must take the slot and finish.

Slow by nature (each `dagster asset materialize` imports torch and the code location): about a
minute and a half on two cores. `pytest -m "not dagster_cli"` leaves them out.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import REPO_ROOT
from clip_assets.demo.shapes import write_collection
from clip_assets.ingest.steps import write_manifest
from clip_assets.instance.pool_slots import HOLDER_RUN_ID, REAPED_RUN_ID
from clip_assets_tests.support.scratch_instance import shipped_instance_yaml
from clip_assets_tests.support.slot_holders import SLOT_HOLDER, assert_slot_free_of, events_with, holds_slot

pytestmark = pytest.mark.dagster_cli

BIG, SMALL = "big", "small"
BIG_IMAGES = 400  # one at a time (CLIP_ASSETS_BATCH_SIZE=1): the run holds the slot for many seconds
SMALL_IMAGES = 6


class CommandLine:
    """A collection of two batches, `big` and `small` (manifests written), a tiny checkpoint, and an
    instance with the repo's dagster.yaml; runs `dagster asset materialize` against them."""

    def __init__(self, root: Path, checkpoint: Path):
        self.root = root
        self.home = root / "dagster_home"
        self.home.mkdir()
        (self.home / "dagster.yaml").write_text(shipped_instance_yaml(self.home))
        images = root / "images"
        write_collection(root / "generated", batches=1, per_batch=BIG_IMAGES, seed=5)
        shutil.move(root / "generated" / "batch-001", images / BIG)
        (images / SMALL).mkdir()
        for path in sorted((images / BIG).glob("img-*"))[:SMALL_IMAGES]:
            shutil.copy(path, images / SMALL / path.name)
        self.layout = DataLayout(root / "data")
        for batch in (BIG, SMALL):
            write_manifest(images, self.layout, batch)
        prompts = root / "prompts"
        shutil.copytree(REPO_ROOT / "prompts", prompts)
        self.env = {
            **os.environ,
            "DAGSTER_HOME": str(self.home),
            "CLIP_ASSETS_IMAGE_ROOT": str(images),
            "CLIP_ASSETS_DATA_DIR": str(self.layout.data_dir),
            "CLIP_ASSETS_PROMPTS_DIR": str(prompts),
            "CLIP_ASSETS_MODEL": "clip-assets-tiny",
            "CLIP_ASSETS_PRETRAINED": str(checkpoint),
            "CLIP_ASSETS_DEVICE": "cpu",
            "CLIP_ASSETS_BATCH_SIZE": "1",
            "CLIP_ASSETS_NUM_WORKERS": "0",
        }
        with self.instance() as instance:
            instance.add_dynamic_partitions("image_batches", [BIG, SMALL])
        self.processes: list[subprocess.Popen] = []

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.home))

    def materialize(self, batch: str) -> subprocess.Popen:
        """`dagster asset materialize` of one batch's embeddings, started; its output goes to a log file."""
        log = (self.root / f"materialize-{len(self.processes)}.log").open("w")
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dagster"),
                "asset",
                "materialize",
                "--select",
                "image_embeddings",
                "--partition",
                batch,
                "-m",
                "clip_assets.definitions",
            ],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        process.log_path = Path(log.name)
        self.processes.append(process)
        return process

    def hold_the_gpu_slot(self) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-c", SLOT_HOLDER],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.processes.append(process)
        return process

    def run_of(self, process: subprocess.Popen, instance: dg.DagsterInstance, timeout_s: float = 300) -> dg.DagsterRun:
        """The run a process executes: the one whose first engine event names its pid."""

        def find():
            for run in instance.get_runs():
                for event in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
                    pid = event.dagster_event.engine_event_data.metadata.get("pid")
                    if pid is not None:
                        if pid.value == str(process.pid):
                            return run
                        break
            return None

        return self.wait(find, timeout_s, f"process {process.pid} to start its run", process)

    def wait(self, ready, timeout_s: float, what: str, process: subprocess.Popen | None = None, poll_s: float = 0.1):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = ready()
            if value:
                return value
            if process is not None and process.poll() is not None:
                pytest.fail(
                    f"process {process.pid} exited ({process.returncode}) while waiting for {what}{self.tail(process)}"
                )
            time.sleep(poll_s)
        pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}{self.tail(process)}")

    @staticmethod
    def tail(process: subprocess.Popen | None) -> str:
        path = getattr(process, "log_path", None)
        return f":\n{path.read_text()[-4000:]}" if path else ""

    def stop_all(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.fixture
def cli(tmp_path, checkpoint):
    cli = CommandLine(tmp_path, checkpoint)
    yield cli
    cli.stop_all()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a live process, from /proc/<pid>/stat (fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    utime, stime = stat[stat.rindex(")") + 2 :].split()[11:13]
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


def test_a_sigkilled_run_is_failed_and_its_slot_freed_by_the_next_run(cli):
    instance = cli.instance()
    first = cli.materialize(BIG)
    dead = cli.run_of(first, instance)
    cli.wait(lambda: holds_slot(instance, dead.run_id), 300, "the first run to hold the gpu slot", first, poll_s=0.02)
    first.send_signal(signal.SIGKILL)  # no cleanup code runs, as with the OOM killer
    first.wait()
    assert not cli.layout.embeddings_path(BIG).exists(), "the first run finished before it was killed"
    assert instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.STARTED
    assert holds_slot(instance, dead.run_id)

    started = time.monotonic()
    second = cli.materialize(SMALL)
    assert second.wait(timeout=600) == 0, cli.tail(second)
    took = time.monotonic() - started

    run = instance.get_run_by_id(dead.run_id)
    assert run.status == dg.DagsterRunStatus.FAILURE
    failure = instance.all_logs(dead.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[-1]
    assert f"process {first.pid} is gone" in failure.message, failure.message
    assert_slot_free_of(instance, dead.run_id)
    (live,) = [r for r in instance.get_runs() if r.run_id != dead.run_id]
    assert live.status == dg.DagsterRunStatus.SUCCESS
    (reaped,) = events_with(instance, live.run_id, REAPED_RUN_ID)
    assert dead.run_id in reaped.message and str(first.pid) in reaped.message, reaped.message
    assert not events_with(instance, live.run_id, HOLDER_RUN_ID), "the second run waited for the dead one"
    assert pq.read_metadata(cli.layout.embeddings_path(SMALL)).num_rows == SMALL_IMAGES
    assert not cli.layout.embeddings_path(BIG).exists()
    print(f"\nsecond run finished {took:.0f}s after it was started, its start included")


def test_a_waiting_run_names_the_holder_sleeps_stops_on_ctrl_c_and_takes_a_dead_holders_slot(cli):
    instance = cli.instance()
    holder = cli.hold_the_gpu_slot()
    held = cli.run_of(holder, instance)
    cli.wait(lambda: holds_slot(instance, held.run_id), 120, "the holder to take the gpu slot", holder)

    waiter = cli.materialize(SMALL)
    waiting = cli.run_of(waiter, instance)
    (told,) = cli.wait(
        lambda: events_with(instance, waiting.run_id, HOLDER_RUN_ID),
        300,
        "the waiting run to say who holds the slot",
        waiter,
    )
    message = told.message
    assert held.run_id in message and f"pid {holder.pid}" in message and "since" in message, message
    assert f"kill {holder.pid}" in message, message  # how to free it
    assert told.dagster_event.engine_event_data.metadata[HOLDER_RUN_ID].value == held.run_id

    before, wall = cpu_seconds(waiter.pid), time.monotonic()
    time.sleep(5)
    used = cpu_seconds(waiter.pid) - before
    wall = time.monotonic() - wall
    assert used < 0.1 * wall, f"the waiting run used {used:.2f} CPU s in {wall:.1f} s"

    interrupted = time.monotonic()
    waiter.send_signal(signal.SIGINT)
    try:
        waiter.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the waiting run ignored SIGINT for 30 s{cli.tail(waiter)}")
    stopped_in = time.monotonic() - interrupted
    assert waiter.returncode != 0
    assert instance.get_run_by_id(waiting.run_id).status == dg.DagsterRunStatus.CANCELED  # not retried as a failure
    assert_slot_free_of(instance, waiting.run_id)
    assert holds_slot(instance, held.run_id) and holder.poll() is None  # the holder was left alone

    # The holder dies while a run waits for its slot: the waiting run fails it and takes the slot.
    third = cli.materialize(SMALL)
    waiting = cli.run_of(third, instance)
    cli.wait(lambda: events_with(instance, waiting.run_id, HOLDER_RUN_ID), 300, "the third run to wait", third)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    killed = time.monotonic()
    assert third.wait(timeout=600) == 0, cli.tail(third)
    took = time.monotonic() - killed
    assert instance.get_run_by_id(held.run_id).status == dg.DagsterRunStatus.FAILURE
    assert_slot_free_of(instance, held.run_id)
    assert instance.get_run_by_id(waiting.run_id).status == dg.DagsterRunStatus.SUCCESS
    (reaped,) = events_with(instance, waiting.run_id, REAPED_RUN_ID)
    assert held.run_id in reaped.message, reaped.message
    print(
        f"\nwaiting run: {used:.2f} CPU s in {wall:.1f} s of waiting; stopped {stopped_in:.1f}s after SIGINT; "
        f"the next one finished {took:.0f}s after its holder was killed"
    )
