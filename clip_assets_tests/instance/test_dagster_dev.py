"""`dagster dev` as people run it: webserver and daemon on loopback, a temp instance, the repo's dagster.yaml.

Nothing is clicked for the first test: the discovery sensor (running by default) must find the
batches, build the centroids and classify every batch through the queued run coordinator, each run
in a run worker process of its own that executes its steps (the code location's executor). The second
launches a backfill of every batch through the webserver's GraphQL API, as the UI does, and checks
that the backfill policies group the batches and that no row is duplicated or lost. The third
(marked `browser`) materializes all four assets of one batch through the API and screenshots the
asset graph with headless Chromium. The fourth SIGKILLs `dagster dev`'s process group in the middle
of an embedding run, restarts it on the same instance, and waits for the daemon alone to fail the
dead run, free its pool slot and finish the batch through a retry. The sensor's runs, the backfill
and the killed run run twice, with the instance's storage in SQLite files and in a Postgres database
on the tests' throwaway server (`[sqlite]`, `[postgres]`); the screenshot and the prompt edit on SQLite.

Slow by nature (every run starts Python processes that import torch): about two minutes on two
cores. `pytest -m "not dagster_dev"` leaves them out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
import yaml
from dagster._core.execution.backfill import BulkActionStatus

from clip_assets.classification.prompts import load_categories, prompt_version
from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import REPO_ROOT
from clip_assets.demo.shapes import write_collection
from clip_assets.storage.warehouse import connect
from clip_assets_tests.support import postgres_server as pg
from clip_assets_tests.support.scratch_instance import shipped_instance_yaml

pytestmark = pytest.mark.dagster_dev

CHROMIUM = Path("/usr/bin/chromium")
BATCHES = [f"batch-{i:03d}" for i in range(1, 9)]
PER_BATCH = 3
BATCH_ASSETS = ["image_manifest", "image_embeddings", "image_classifications"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# How often the daemon looks, and nothing else, shorter than dagster.yaml's: the queue every second, not
# every 5 s (each run waited about 2.5 s to start); run monitoring every 2 s, not 30 s (the killed run's
# retry waited up to a whole poll for the dead run's `gpu` slot to be freed). What the daemon does when
# it looks (fail a dead run, free its slots after free_slots_after_run_end_seconds) stays as shipped.
QUEUE_POLL_S = 1
MONITORING_POLL_S = 2
# And the sensors (discovery, the prompt files' observation, the automation) tick every 5 s, not 30 s
# (CLIP_ASSETS_SENSOR_INTERVAL_S): each step of discovery -> centroids -> batches, and of a prompt edit ->
# observation -> centroids -> classifications, waited up to a whole interval for the next tick.
SENSOR_INTERVAL_S = 5


def polling_sooner(instance_yaml: str) -> str:
    config = yaml.safe_load(instance_yaml)
    config["run_coordinator"].setdefault("config", {})["dequeue_interval_seconds"] = QUEUE_POLL_S
    config["run_monitoring"]["poll_interval_seconds"] = MONITORING_POLL_S
    return yaml.safe_dump(config, sort_keys=False)


class DagsterDev:
    def __init__(self, root: Path, checkpoint: Path, batches: int = len(BATCHES), per_batch: int = PER_BATCH,
                 env: dict[str, str] | None = None, start: bool = True, storage: dict | None = None):
        self.root = root
        self.home = root / "dagster_home"
        self.home.mkdir()
        # The shipped instance config, its storage folder made absolute so this test can open it too, or
        # its storage a Postgres database (`storage`: the conftest's instance_storage); the daemon polls sooner.
        (self.home / "dagster.yaml").write_text(polling_sooner(shipped_instance_yaml(self.home, storage)))
        self.images, self.data, self.prompts = root / "images", root / "data", root / "prompts"
        write_collection(self.images, batches=batches, per_batch=per_batch, seed=21)
        shutil.copytree(REPO_ROOT / "prompts", self.prompts)
        self.layout = DataLayout(self.data)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "DAGSTER_HOME": str(self.home),
            "CLIP_ASSETS_IMAGE_ROOT": str(self.images),
            "CLIP_ASSETS_DATA_DIR": str(self.data),
            "CLIP_ASSETS_PROMPTS_DIR": str(self.prompts),
            "CLIP_ASSETS_MODEL": "clip-assets-tiny",
            "CLIP_ASSETS_PRETRAINED": str(checkpoint),
            "CLIP_ASSETS_DEVICE": "cpu",
            "CLIP_ASSETS_BATCH_SIZE": "8",
            "CLIP_ASSETS_NUM_WORKERS": "0",
            "CLIP_ASSETS_SENSOR_INTERVAL_S": str(SENSOR_INTERVAL_S),
            **(env or {}),
        }
        self.log = (root / "dagster_dev.log").open("w")
        if start:
            self.start()

    def start(self):
        self.started = time.monotonic()
        # cwd = the instance folder: dagster.yaml's relative storage paths land in the temp dir
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dagster", "dev", "-m", "clip_assets.definitions",
             "-h", "127.0.0.1", "-p", str(self.port)],
            cwd=self.home, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.wait(lambda: self.get("/server_info"), 180, "the webserver to answer")

    def kill(self):
        """SIGKILL the whole process group: webserver, daemon, code server, run workers, step processes."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.read()
        except OSError:
            return None

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(self.url + "/graphql", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert "errors" not in answer, answer
        return answer["data"]

    def wait(self, ready, timeout_s: float, what: str, poll_s: float = 2):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"dagster dev exited while waiting for {what}: {self.tail()}")
            value = ready()
            if value:
                return value
            time.sleep(poll_s)
        pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}: {self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return (self.root / "dagster_dev.log").read_text()[-4000:]

    def rows(self, sql: str):
        if not self.layout.duckdb_path.exists():
            return []
        with connect(self.layout.duckdb_path, read_only=True) as con:  # waits while a writer holds the lock
            return con.execute(sql).fetchall()

    def instance(self):
        return dg.DagsterInstance.from_config(str(self.home))

    def stop(self):
        """Ctrl-C, as a terminal sends it to the whole process group; what is still up after 20 s is killed
        (after the killed-and-restarted run, SIGTERM alone left the group up for its whole 60 s)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def dev(request, tmp_path_factory, checkpoint):
    """One `dagster dev` per instance storage its tests name (parametrized "sqlite" or "postgres")."""
    storage = None
    if request.param == "postgres":
        storage = pg.storage_config(request.getfixturevalue("postgres_server").new_database())
    server = DagsterDev(tmp_path_factory.mktemp(f"dagster_dev_{request.param}"), checkpoint, storage=storage)
    yield server
    server.stop()


# The sensor's runs, a backfill and the killed run on Postgres too, when asked for (`-m dagster_dev_postgres`:
# about seven minutes of waiting on the daemon's ticks, left out of the default run); the UI screenshot and
# the prompt edit, which test the project's assets and automation rather than the instance, on SQLite only.
ON_POSTGRES_WHEN_ASKED = pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.dagster_dev_postgres])
ON_EACH_STORAGE = pytest.mark.parametrize("dev", ["sqlite", ON_POSTGRES_WHEN_ASKED], indirect=True)
ON_SQLITE = pytest.mark.parametrize("dev", ["sqlite"], indirect=True)


def per_batch(dev) -> list[tuple]:
    return dev.rows(
        "SELECT batch, count(*), count(DISTINCT (image_id, category)) FROM image_classifications "
        "GROUP BY batch ORDER BY batch"
    )


def expected_rows(dev) -> list[tuple]:
    n = PER_BATCH * len(load_categories(dev.prompts))
    return [(b, n, n) for b in BATCHES]


def runs_by_status(instance, tags: dict | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    for run in instance.get_runs(filters=dg.RunsFilter(tags=tags or {})):
        out[run.status.value] = out.get(run.status.value, 0) + 1
    return out


def settled(instance) -> bool:
    counts = runs_by_status(instance)
    return not {"QUEUED", "NOT_STARTED", "STARTING", "STARTED"} & set(counts)


# Longer than the daemon takes to tick the automation sensor again (its interval, after up to a 5 s loop),
# with room for slow ticks on busy shared cores (one came 19 s after the run it followed).
QUIET_S = 6 * SENSOR_INTERVAL_S


def quiet_for(instance, seconds: float = QUIET_S) -> bool:
    """Settled, no backfill waiting for its runs (automation requests partition ranges as backfills,
    whose runs come later), and no run created or finished for `seconds`: longer than an automation
    tick, so what the last materializations set off (the index shards, then near-duplicates, which
    follows the copy threshold's run however long that took) has run."""
    last = max((max(r.create_timestamp.timestamp(), r.end_time or 0) for r in instance.get_run_records()), default=0)
    return (settled(instance) and not instance.get_backfills(status=BulkActionStatus.REQUESTED)
            and time.time() - last > seconds)


@ON_EACH_STORAGE
def test_daemon_alone_classifies_every_new_batch(dev):
    """Nobody clicks: the sensor registers 8 batches, the centroids are built, every batch is classified."""
    dev.wait(lambda: per_batch(dev) == expected_rows(dev), 600, "the sensor's runs to classify every batch")
    instance = dev.instance()
    dev.wait(lambda: settled(instance), 120, "the queue to drain")
    assert sorted(instance.get_dynamic_partitions("image_batches")) == BATCHES
    statuses = runs_by_status(instance)
    assert set(statuses) == {"SUCCESS"}, (statuses, dev.tail())
    # every sensor ticked several times meanwhile, and the daemon said so at debug level only
    dev.log.flush()
    said = (dev.root / "dagster_dev.log").read_text()
    assert "Checking for new runs for sensor" not in said and "Prefetching asset records" not in said
    print(f"\ndiscovery: {statuses['SUCCESS']} runs, {len(BATCHES)} batches classified in "
          f"{time.monotonic() - dev.started:.0f}s from `dagster dev` start")


LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on InvalidSubsetError { message }
    ... on PartitionSetNotFoundError { message }
    ... on UnauthorizedError { message }
  }
}"""

BACKFILL_STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status }
    ... on PythonError { message }
  }
}"""


def launch_backfill(dev, params: dict) -> str:
    answer = dev.graphql(LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
    assert answer["__typename"] == "LaunchBackfillSuccess", answer
    return answer["backfillId"]


def wait_for_backfill(dev, backfill_id: str, timeout_s: float) -> str:
    def done():
        status = dev.graphql(BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"]["status"]
        return status if status not in ("REQUESTED", "CANCELING", "FAILING") else None

    return dev.wait(done, timeout_s, f"backfill {backfill_id}")


def materializations(instance, key: str) -> dict[str, int]:
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey(key)), limit=10000).records
    out: dict[str, int] = {}
    for r in records:
        out[r.partition_key] = out.get(r.partition_key, 0) + 1
    return out


@ON_EACH_STORAGE
def test_backfill_of_every_batch_through_the_graphql_api(dev):
    """What the UI's partition picker launches: one backfill of all batches, grouped by the backfill policies."""
    dev.wait(lambda: per_batch(dev) == expected_rows(dev), 600, "the sensor's runs")
    instance = dev.instance()
    dev.wait(lambda: settled(instance), 120, "the queue to drain")
    before = {k: materializations(instance, k) for k in BATCH_ASSETS}

    started = time.monotonic()
    backfill_id = launch_backfill(dev, {
        "partitionNames": BATCHES,
        "assetSelection": [{"path": [k]} for k in BATCH_ASSETS],
        "title": "all batches",
    })
    assert wait_for_backfill(dev, backfill_id, 600) == "COMPLETED_SUCCESS", dev.tail()
    duration = time.monotonic() - started

    statuses = runs_by_status(instance, {"dagster/backfill": backfill_id})
    assert set(statuses) == {"SUCCESS"}, statuses
    runs = statuses["SUCCESS"]
    # multi_run(8) for manifests and embeddings: the 8 batches share one run (one model load);
    # single_run for classifications: one more run. Without the policies this would be 8 runs or more.
    assert runs <= 3, statuses
    for key in BATCH_ASSETS:
        after = materializations(instance, key)
        assert {b: after.get(b, 0) - before[key].get(b, 0) for b in BATCHES} == dict.fromkeys(BATCHES, 1), key
    assert per_batch(dev) == expected_rows(dev)  # nothing duplicated, nothing lost
    total = dev.rows("SELECT count(*), count(DISTINCT (batch, image_id, category)) FROM image_classifications")[0]
    assert total[0] == total[1] == sum(n for _, n, _ in expected_rows(dev))
    print(f"\nbackfill {backfill_id}: {runs} runs, {len(BATCHES)} batches, {total[0]} classification rows, "
          f"{duration:.0f}s")


def distinct_colours(png: Path) -> int:
    from PIL import Image

    with Image.open(png) as image:
        return len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
@ON_SQLITE
def test_ui_materializes_a_batch_and_shows_the_asset_graph(dev, tmp_path_factory):
    dev.wait(lambda: per_batch(dev) == expected_rows(dev), 600, "the sensor's runs")
    instance = dev.instance()
    dev.wait(lambda: settled(instance), 120, "the queue to drain")
    before = {k: materializations(instance, k).get("batch-003", 0) for k in BATCH_ASSETS}
    centroids_before = len(instance.fetch_materializations(dg.AssetKey("prompt_centroids"), limit=1000).records)

    backfill_id = launch_backfill(dev, {
        "partitionsByAssets": [
            {"assetKey": {"path": ["prompt_centroids"]}},
            *({"assetKey": {"path": [k]}, "partitions": {"range": {"start": "batch-003", "end": "batch-003"}}}
              for k in BATCH_ASSETS),
        ],
        "title": "one batch, all four assets",
    })
    assert wait_for_backfill(dev, backfill_id, 600) == "COMPLETED_SUCCESS", dev.tail()
    for key in BATCH_ASSETS:
        assert materializations(instance, key).get("batch-003", 0) == before[key] + 1
    assert len(instance.fetch_materializations(dg.AssetKey("prompt_centroids"), limit=1000).records) == centroids_before + 1
    assert per_batch(dev) == expected_rows(dev)

    shots = tmp_path_factory.mktemp("screenshots")
    png = shots / "asset_graph.png"
    done = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={shots / 'profile'}", "--virtual-time-budget=20000", "--window-size=1600,1000",
         f"--screenshot={png}", f"{dev.url}/asset-groups"],
        capture_output=True, text=True, timeout=180,
    )
    assert png.exists(), done.stderr[-3000:]
    colours = distinct_colours(png)
    print(f"\nscreenshot of the asset graph: {png} ({colours} distinct colours)")
    assert colours > 50, f"the screenshot looks blank: {colours} colours"


def latest_per_partition(instance, key: str) -> dict[str, dg.EventLogRecord]:
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey(key)), limit=10000).records
    out: dict[str, dg.EventLogRecord] = {}
    for r in records:  # newest first
        out.setdefault(r.partition_key, r)
    return out


def observation_only_runs(instance) -> list[str]:
    """Runs that did nothing but observe prompt_files (what the cron automation used to launch every minute)."""
    return [r.run_id for r in instance.get_runs()
            if r.asset_selection == {dg.AssetKey("prompt_files")} or r.job_name == "observe_prompt_files"]


@ON_SQLITE
def test_prompt_edit_reruns_centroids_and_classifications_without_observation_runs(dev):
    """The daemon alone: a prompt edit is observed by a sensor without a run, and the eager
    automation re-runs the centroids and every batch's classifications, never the embeddings; then
    what follows the classifications (evaluation, calibration), and nothing else."""
    dev.wait(lambda: per_batch(dev) == expected_rows(dev), 600, "the sensor's runs")
    instance = dev.instance()
    dev.wait(lambda: quiet_for(instance), 300, "the runs the new embeddings set off to finish")
    embeddings_before = materializations(instance, "image_embeddings")
    classifications_before = materializations(instance, "image_classifications")
    runs_before = {r.run_id for r in instance.get_runs()}
    assert observation_only_runs(instance) == []  # minutes of the daemon so far, and not one

    path = dev.prompts / "demo_shapes.toml"
    path.write_text(path.read_text().replace('"a star", "a photo of a star"', '"a star", "a five-pointed star"'))
    new_version = prompt_version(dev.prompts)
    edited = time.monotonic()

    def rerun_done():
        versions = dev.rows("SELECT DISTINCT prompt_version FROM image_classifications")
        return versions == [(new_version,)] and per_batch(dev) == expected_rows(dev) and settled(instance)

    dev.wait(rerun_done, 600, "the prompt edit to re-classify every batch")
    print(f"\nprompt edit -> every batch re-classified in {time.monotonic() - edited:.0f}s")
    # Everything the edit set off, down to the assets that read the classifications, has run.
    dev.wait(lambda: quiet_for(instance), 300, "the runs the new classifications set off to finish")
    assert dev.rows("SELECT DISTINCT prompt_version FROM prompt_centroids") == [(new_version,)]

    observations = instance.fetch_observations(dg.AssetKey("prompt_files"), limit=1000).records
    assert observations[0].asset_observation.data_version == new_version
    assert observations[0].run_id == ""  # recorded by the sensor, outside any run
    assert observation_only_runs(instance) == []
    new_runs = [r for r in instance.get_runs() if r.run_id not in runs_before]
    assert new_runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in new_runs)
    selected = set().union(*(r.asset_selection or set() for r in new_runs))
    assert {dg.AssetKey("prompt_centroids"), dg.AssetKey("image_classifications")} <= selected, selected
    assert selected <= {dg.AssetKey("prompt_centroids"), dg.AssetKey("category_adapters"),
                        dg.AssetKey("image_classifications"), dg.AssetKey("image_evaluation"),
                        dg.AssetKey("threshold_calibration")}, selected
    assert materializations(instance, "image_embeddings") == embeddings_before
    after = materializations(instance, "image_classifications")
    assert {b: after[b] - classifications_before.get(b, 0) for b in BATCHES} == dict.fromkeys(BATCHES, 1)

    # each batch's new materialization carries its own figures, however many batches its run covered
    latest = latest_per_partition(instance, "image_classifications")
    n_categories = len(load_categories(dev.prompts))
    for batch in BATCHES:
        meta = latest[batch].asset_materialization.metadata
        assert meta["prompt_version"].value == new_version
        assert meta["dagster/row_count"].value == PER_BATCH * n_categories and meta["images"].value == PER_BATCH
        assert {r.data["path"].split("/")[0] for r in meta["top_images"].value.records} == {batch}
        assert "contact_sheet" in meta and "score_distribution" in meta
    print(f"re-run: {len(new_runs)} runs, batches per classification run: "
          f"{sorted(latest[b].asset_materialization.metadata['batches_in_run'].value for b in BATCHES)}")


KILLED_BATCH_IMAGES = 400

LAUNCH_RUN = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message stack }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""


def launch_run(dev, job: str, assets: list[str], tags: dict[str, str]) -> str:
    """What the UI's Materialize button sends: a run of the selected assets, queued."""
    answer = dev.graphql(LAUNCH_RUN, {"params": {
        "selector": {"repositoryLocationName": "clip_assets.definitions", "repositoryName": "__repository__",
                     "jobName": job, "assetSelection": [{"path": [a]} for a in assets]},
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
    }})["launchRun"]
    assert answer["__typename"] == "LaunchRunSuccess", answer
    return answer["run"]["runId"]


@pytest.mark.parametrize("instance_storage", ["sqlite", ON_POSTGRES_WHEN_ASKED], indirect=True)
def test_a_killed_dagster_dev_fails_frees_and_retries_its_run_after_a_restart(
    tmp_path_factory, checkpoint, instance_storage
):
    """SIGKILL of `dagster dev`'s process group in the middle of an embedding run, then a restart.

    Nobody clicks after the restart: run monitoring finds the dead run's worker gone and fails the
    run, the monitoring daemon frees its `gpu` slot, run retries re-run it from the unfinished step,
    and the embedding step resumes from the part files the killed run left.
    """
    # The sensors at their own interval: nothing here waits for a tick, and sooner ticks of the automation
    # sensor would build the centroids beside the embedding run, on the same cores.
    server = DagsterDev(tmp_path_factory.mktemp("killed_dagster_dev"), checkpoint, batches=1,
                        per_batch=KILLED_BATCH_IMAGES, start=False, storage=instance_storage,
                        env={"CLIP_ASSETS_CHUNK_ROWS": "16", "CLIP_ASSETS_SENSOR_INTERVAL_S": ""})
    batch = "batch-001"
    # Registered beforehand, so the discovery sensor leaves it alone and the embedding run below is
    # the only one (the sensor's runs would also build centroids and classify: minutes more).
    with server.instance() as instance:
        instance.add_dynamic_partitions("image_batches", [batch])
    server.start()
    try:
        launched = launch_run(server, "__ASSET_JOB", ["image_manifest", "image_embeddings"], {"dagster/partition": batch})
        parts = server.layout.embedding_parts_dir(batch)
        server.wait(lambda: len(list(parts.glob("part-*.parquet"))) >= 2, 1800,
                    "the embedding run to write part files", poll_s=0.05)
        server.kill()
        assert not server.layout.embeddings_path(batch).exists(), "the run finished before the kill"
        instance = server.instance()
        # The embedding run, and whatever else was running (the automation sensor's observations)
        started = [r for r in instance.get_runs() if r.status == dg.DagsterRunStatus.STARTED]
        [dead] = [r for r in started if r.run_id == launched]
        gpu = instance.event_log_storage.get_concurrency_info("gpu")
        assert gpu.active_run_ids == {dead.run_id}  # the dead run holds the GPU slot
        done_before = sum(pq.read_metadata(p).num_rows for p in parts.glob("part-*.parquet"))
        killed_at = time.monotonic()

        server.start()

        def retried():
            if any(instance.get_run_by_id(r.run_id).status != dg.DagsterRunStatus.FAILURE for r in started):
                return None  # every run that was STARTED at the kill is failed, none left STARTED
            children = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/parent_run_id": dead.run_id}))
            return children if children and children[0].is_finished else None
        retry = server.wait(retried, 1800, "the dead run to be failed and retried")[0]
        recovered_in = time.monotonic() - killed_at
        assert retry.status == dg.DagsterRunStatus.SUCCESS, server.tail()
        failure = instance.all_logs(dead.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[-1]
        assert "run worker process" in failure.message and "is gone" in failure.message, failure.message

        manifest = pq.read_table(server.layout.manifest_path(batch))
        # The manifest only stats files: one that is not an image is "ok" there and fails its decoding.
        undecodable = set(pq.read_table(server.layout.embedding_failures_path(batch))["image_id"].to_pylist())
        usable = {r["image_id"] for r in manifest.to_pylist() if r["status"] == "ok"} - undecodable
        ids = pq.read_table(server.layout.embeddings_path(batch))["image_id"].to_pylist()
        assert len(ids) == len(set(ids)) and set(ids) == usable  # every image exactly once
        assert not parts.exists()
        record = instance.fetch_materializations(
            dg.AssetKey("image_embeddings"), limit=1
        ).records[0]
        assert record.run_id == retry.run_id
        metadata = record.asset_materialization.metadata
        assert metadata["resumed"].value == done_before > 0
        assert metadata["encoded"].value == len(usable) - done_before
        gpu = instance.event_log_storage.get_concurrency_info("gpu")
        assert not gpu.active_run_ids and not gpu.pending_run_ids  # no slot left claimed
        print(f"\nkilled after {done_before} of {len(usable)} images; dead run failed, slot freed and retry "
              f"{retry.run_id[:8]} finished {recovered_in:.0f}s after the kill (restart included)")
    finally:
        server.stop()
