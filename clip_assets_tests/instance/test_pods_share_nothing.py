"""Pods share nothing but the instance and the store: the pipeline as it runs on Kubernetes, on one machine.

The Dagster daemon, the code server (`dagster api grpc`) and every run worker (`dagster api execute_run`,
started per run by clip_assets_tests/support/pod_run_launcher.py as K8sRunLauncher starts a pod) are
separate processes, each with a working directory, a DAGSTER_HOME, a TMPDIR and a CLIP_ASSETS_CACHE_DIR
of its own. What they share is what a cluster's pods share: the instance in Postgres (the tests'
throwaway server, reached through deploy/dagster.k8s.yaml's own storage block and DAGSTER_PG_*
variables), and a bucket on the loopback S3 server holding both the image root and the data directory,
with the classifications in the per-batch parquet warehouse: the settings of
deploy/clip-assets-settings.yaml. The prompt files and the model checkpoint are one local path every
process reads, as every pod reads them from its container image (or a ConfigMap).

Nobody clicks. Two batches in the bucket are discovered by the sensor, the centroids built, the batches
embedded, classified and indexed. A third batch put in the bucket afterwards is discovered too; its run
worker is SIGKILLed in the middle of the embedding, and the daemon fails the run (run monitoring) and
retries it in a new worker, with a new, empty cache folder, which resumes from the part files the dead
one left in the bucket. A prompt edit meanwhile re-classifies every batch without re-embedding any.

About two and a half minutes on two shared cores, most of it the run workers' start (each imports torch and
loads the model, as a pod does) and the daemon's ticks, though they tick every few seconds here.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
import yaml

from clip_assets.classification.prompts import load_categories, prompt_version
from clip_assets.config.settings import REPO_ROOT
from clip_assets.demo.shapes import write_collection
from clip_assets.instance.run_launcher import run_process
from clip_assets.storage import object_store, parquet_warehouse
from clip_assets_tests.support import postgres_server as pg
from clip_assets_tests.support.models import TINY
from clip_assets_tests.support.pod_run_launcher import pod_folders

pytestmark = [pytest.mark.dagster_dev, pytest.mark.postgres]

K8S_INSTANCE = REPO_ROOT / "deploy" / "dagster.k8s.yaml"
FIRST = ["batch-001", "batch-002"]  # in the bucket when the daemon starts
BIG = "batch-003"  # put in the bucket once those are classified; its run worker is killed while it embeds
BIG_IMAGES = 400
CHUNK_ROWS = 16
# The sensors tick every 5 s (CLIP_ASSETS_SENSOR_INTERVAL_S), the queue is read every second and run
# monitoring looks every 2 s, where a deployment keeps 30 s, 5 s and 30 s: as test_dagster_dev.py does.
SENSOR_INTERVAL_S = 5
QUEUE_POLL_S = 1
MONITORING_POLL_S = 2
WAIT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """In a child before it starts: SIGTERM when the test process dies (a killed pytest leaves no daemon)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Machine:
    """One process's own surroundings: what a pod has that no other pod sees."""

    def __init__(self, root: Path, name: str, instance_yaml: str, env: dict[str, str]):
        self.root = root / name
        self.home, self.tmp, self.cache, self.work = (self.root / n for n in ("dagster_home", "tmp", "cache", "work"))
        for folder in (self.home, self.tmp, self.cache, self.work):
            folder.mkdir(parents=True)
        (self.home / "dagster.yaml").write_text(instance_yaml)
        self.env = {**env, "DAGSTER_HOME": str(self.home), "TMPDIR": str(self.tmp),
                    "CLIP_ASSETS_CACHE_DIR": str(self.cache)}
        self.log_path = self.root / "process.log"
        self.process: subprocess.Popen | None = None

    def start(self, *args: str) -> subprocess.Popen:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", *args], cwd=self.work, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=die_with_parent)  # noqa: PLW1509 (one prctl before exec)
        return self.process

    def tail(self, chars: int = 3000) -> str:
        return f"--- {self.root.name}:\n" + (self.log_path.read_text(errors="replace")[-chars:]
                                            if self.log_path.exists() else "(no log)")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the daemon's group holds the run workers it started
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def instance_yaml(postgres_port: int, pods_dir: Path, config_file: Path) -> str:
    """deploy/dagster.k8s.yaml as shipped (Postgres from DAGSTER_PG_*, queue, pools, run monitoring and
    retries), but for its port (the test server's), its run launcher (a process per run instead of a
    Kubernetes job per run), and how often the queue and run monitoring look (so the test waits less)."""
    config = yaml.safe_load(K8S_INSTANCE.read_text())
    assert config["storage"]["postgres"]["postgres_db"]["port"] == 5432
    config["storage"]["postgres"]["postgres_db"]["port"] = postgres_port
    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    config["run_launcher"] = {
        "module": "clip_assets_tests.support.pod_run_launcher", "class": "PodRunLauncher",
        "config": {"pods_dir": str(pods_dir), "instance_config_file": str(config_file)},
    }
    config["run_monitoring"]["poll_interval_seconds"] = MONITORING_POLL_S
    config["run_coordinator"]["config"] = {"dequeue_interval_seconds": QUEUE_POLL_S}
    return yaml.safe_dump(config)


def upload_batches(s3_store, local: Path, prefix: str, names: dict[str, str]) -> None:
    """Each local batch folder put in the bucket under `prefix/<new name>/`, as a user's `aws s3 sync` would."""
    fs = s3_store.filesystem()
    for old, new in names.items():
        for path in sorted(p for p in (local / old).rglob("*") if p.is_file()):
            fs.pipe(f"{s3_store.bucket}/{prefix}/{new}/{path.relative_to(local / old).as_posix()}", path.read_bytes())


def wait(ready, timeout_s: float, what: str, machines: list[Machine], poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for m in machines:
            if m.process is not None and m.process.poll() is not None:
                pytest.fail(f"{m.root.name} exited while waiting for {what}:\n{m.tail()}")
        value = ready()
        if value:
            return value
        time.sleep(poll_s)
    pods = "\n".join(f"--- {p.name}:\n{(p / 'worker.log').read_text(errors='replace')[-2000:]}"
                     for p in pod_folders(machines[0].root.parent / "pods"))
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}:\n" + "\n".join(m.tail() for m in machines)
                + "\n" + pods)


def in_flight(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return [r for r in instance.get_runs() if not r.is_finished]


def classified(reader_root: Path) -> dict[str, tuple[set[str], int]]:
    """Per batch: the prompt versions of its classification rows and how many rows, read from the bucket."""
    with parquet_warehouse.reader(reader_root) as con:
        rows = con.execute("SELECT batch, list(DISTINCT prompt_version), count(*) FROM image_classifications "
                           "GROUP BY batch").fetchall()
    return {batch: (set(versions), n) for batch, versions, n in rows}




def materialized(instance: dg.DagsterInstance, key: str, batch: str) -> list[dg.EventLogRecord]:
    """The batch's materializations of `key`, newest first."""
    return instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[batch]), limit=100
    ).records


def test_daemon_code_server_and_run_workers_share_only_postgres_and_the_bucket(
    tmp_path, s3_store, postgres_server, checkpoint, monkeypatch
):
    started = time.monotonic()
    database = postgres_server.new_database().rsplit("/", 1)[1]
    pods_dir = tmp_path / "pods"
    pods_dir.mkdir()
    config_map = tmp_path / "instance-configmap.yaml"  # what every pod mounts as DAGSTER_HOME/dagster.yaml
    config_map.write_text(instance_yaml(postgres_server.port, pods_dir, config_map))
    prompts = tmp_path / "prompts"  # in the container image: the same files in every pod
    shutil.copytree(REPO_ROOT / "prompts", prompts)
    # What the ConfigMap clip-assets-settings and the Secrets give every pod (the AWS_* variables are the
    # s3_store fixture's, in this process's environment as a pod's role or Secret would put them).
    settings = {
        "CLIP_ASSETS_IMAGE_ROOT": s3_store.url("images"),
        "CLIP_ASSETS_DATA_DIR": s3_store.url("data"),
        "CLIP_ASSETS_WAREHOUSE": "parquet",
        "CLIP_ASSETS_PROMPTS_DIR": str(prompts),
        "CLIP_ASSETS_MODEL": TINY,
        "CLIP_ASSETS_PRETRAINED": str(checkpoint),
        "CLIP_ASSETS_DEVICE": "cpu",
        "CLIP_ASSETS_BATCH_SIZE": "8",
        "CLIP_ASSETS_NUM_WORKERS": "0",
        "CLIP_ASSETS_CHUNK_ROWS": str(CHUNK_ROWS),
        "CLIP_ASSETS_SENSOR_INTERVAL_S": str(SENSOR_INTERVAL_S),
        "DAGSTER_PG_USERNAME": pg.SUPERUSER,
        "DAGSTER_PG_PASSWORD": "",
        "DAGSTER_PG_HOST": postgres_server.host,
        "DAGSTER_PG_DB": database,
    }
    for name in ("DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_HOST", "DAGSTER_PG_DB"):
        monkeypatch.setenv(name, settings[name])  # this test's own look at the instance reads them too
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIP_ASSETS_", "DAGSTER_"))} | settings
    local = tmp_path / "local_images"
    write_collection(local / "small", batches=2, per_batch=3, seed=21)
    write_collection(local / "big", batches=1, per_batch=BIG_IMAGES, seed=22)
    upload_batches(s3_store, local / "small", "images", {"batch-001": FIRST[0], "batch-002": FIRST[1]})

    port = free_port()
    code_server, daemon, observer = (Machine(tmp_path, name, config_map.read_text(), env)
                                     for name in ("code_server", "daemon", "observer"))
    everything = [code_server, daemon]
    from dagster._grpc.client import DagsterGrpcClient

    def code_server_answers() -> bool:
        try:
            DagsterGrpcClient(port=port, host="127.0.0.1").ping("up")
            return True
        except Exception:  # noqa: BLE001 (not listening yet)
            return False

    try:
        # --empty-working-directory: the runs' code origin names no folder of the code server's.
        code_server.start("dagster", "api", "grpc", "-m", "clip_assets.definitions", "-h", "127.0.0.1", "-p",
                          str(port), "--use-python-environment-entry-point", "--empty-working-directory")
        wait(code_server_answers, WAIT_S, "the code server", [code_server], poll_s=0.5)
        daemon.start("dagster._daemon", "run", "--grpc-host", "127.0.0.1", "--grpc-port", str(port))
        instance = dg.DagsterInstance.from_config(str(observer.home))
        reader_root = object_store.open_store(s3_store.url("data"), cache_dir=observer.cache).local_root / "warehouse"
        old_version = prompt_version(prompts)

        # 1. Two batches in the bucket: discovered, the centroids built, both embedded and classified.
        wait(lambda: set(classified(reader_root)) == set(FIRST), WAIT_S, "the first batches classified", everything)
        assert [v for v, _ in classified(reader_root).values()] == [{old_version}] * len(FIRST)

        # 2. A big batch arrives; its run worker is SIGKILLed in the middle of its embedding.
        upload_batches(s3_store, local / "big", "images", {"batch-001": BIG})
        parts_prefix = f"data/embeddings/{BIG}.parts/"
        wait(lambda: len([k for k in s3_store.keys(parts_prefix) if k.endswith(".parquet")]) >= 2, WAIT_S,
             "the big batch's run worker to put part files in the bucket", everything, poll_s=0.05)
        [killed_run] = [r for r in in_flight(instance) if r.tags.get("dagster/partition") == BIG]
        os.kill(run_process(instance, killed_run.run_id).pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert f"data/embeddings/{BIG}.parquet" not in s3_store.keys("data/embeddings/"), "it finished first"
        fs = s3_store.filesystem()
        parts = [k for k in s3_store.keys(parts_prefix) if k.endswith(".parquet")]
        done_before = sum(pq.ParquetFile(fs.open(f"{s3_store.bucket}/{k}")).metadata.num_rows for k in parts)

        # 3. A prompt is edited (the prompt files are the code server's and the workers' one local copy).
        path = prompts / "demo_shapes.toml"
        path.write_text(path.read_text().replace('"a star", "a photo of a star"', '"a star", "a five-pointed star"'))
        new_version = prompt_version(prompts)
        all_batches = [*FIRST, BIG]
        # Per batch: its embeddings, its search rows and index shard note (a collection under 20,000 images
        # is searched exactly: no faiss shard yet), its classifications.
        wanted_keys = {f"data/{folder}/{b}.{ext}" for b in all_batches
                       for folder, ext in (("embeddings", "parquet"), ("search_index", "f32"), ("ann_index", "json"),
                                           ("warehouse/classifications", "parquet"))}

        def done():
            retries = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/parent_run_id": killed_run.run_id}))
            if not retries or not retries[0].is_finished or not wanted_keys <= set(s3_store.keys("data/")):
                return False
            found = classified(reader_root)
            if not (set(found) == set(all_batches) and all(v == {new_version} for v, _ in found.values())):
                return False
            # The rows can land before their materialization is recorded: a run over several batches whose
            # step failed on one of them has written the others' rows, and the runs it is split into record them.
            return all(classification_versions(batch)[:1] == [new_version] for batch in all_batches)

        def classification_versions(batch: str) -> list[str]:
            """The prompt version of each of the batch's classification materializations, newest first."""
            return [r.asset_materialization.metadata["prompt_version"].value
                    for r in materialized(instance, "image_classifications", batch)]

        wait(done, WAIT_S, "every batch embedded, indexed and classified with the edited prompts", everything,
             poll_s=2)
        settled_in = time.monotonic() - started

        # The new batch was found by the sensor: nobody but the sensor registers partitions here.
        assert sorted(instance.get_dynamic_partitions("image_batches")) == all_batches
        # The killed run: failed by run monitoring (its worker gone), retried in a new pod, which resumed.
        dead = instance.get_run_by_id(killed_run.run_id)
        assert dead.status == dg.DagsterRunStatus.FAILURE
        failure = instance.all_logs(dead.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[-1]
        assert "is gone" in failure.message, failure.message
        [retry] = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/parent_run_id": dead.run_id}))
        assert retry.status == dg.DagsterRunStatus.SUCCESS
        pods = {p.name.rsplit("-", 1)[1]: p for p in pod_folders(pods_dir)}
        killed_pod, retry_pod = pods[dead.run_id[:8]], pods[retry.run_id[:8]]
        assert killed_pod != retry_pod  # a new folder, so a new, empty cache: the parts came from the bucket
        [embedded] = materialized(instance, "image_embeddings", BIG)
        assert embedded.run_id == retry.run_id
        meta = embedded.asset_materialization.metadata
        data = f"{s3_store.bucket}/data"
        ids = pq.read_table(fs.open(f"{data}/embeddings/{BIG}.parquet"))["image_id"].to_pylist()
        assert meta["resumed"].value == done_before > 0
        assert meta["encoded"].value == len(ids) - done_before  # only the rest: nothing encoded twice
        manifest = pq.read_table(fs.open(f"{data}/manifest/{BIG}.parquet")).to_pylist()
        failed = set(pq.read_table(fs.open(f"{data}/embedding_failures/{BIG}.parquet"))["image_id"].to_pylist())
        assert len(ids) == len(set(ids))
        assert set(ids) == {r["image_id"] for r in manifest if r["status"] == "ok"} - failed  # each usable image once
        assert s3_store.keys(parts_prefix) == []  # the parts were removed from the bucket

        # Every batch embedded once (the prompt edit re-embedded none) and indexed; the first two classified
        # with the old prompts and again with the new, every row with the new now.
        categories = len(load_categories(prompts))
        found = classified(reader_root)
        for batch in all_batches:
            assert len(materialized(instance, "image_embeddings", batch)) == 1, batch
            assert materialized(instance, "image_search_index", batch), batch
            n = pq.read_metadata(fs.open(f"{data}/embeddings/{batch}.parquet")).num_rows
            assert found[batch] == ({new_version}, n * categories), batch
        for batch in FIRST:  # classified with the old prompts, then again with the new
            assert {old_version, new_version} <= set(classification_versions(batch)), batch
        centroids = instance.fetch_materializations(dg.AssetKey("prompt_centroids"), limit=1).records
        assert centroids[0].asset_materialization.metadata["prompt_version"].value == new_version

        # Every run that ran did so in a pod of its own.
        ran = {r.run_id[:8] for r in instance.get_runs() if r.status == dg.DagsterRunStatus.SUCCESS}
        assert ran <= set(pods) and len(pods) == len(pod_folders(pods_dir))
        print(f"\n{len(pods)} run workers, each in its own folder; the big batch's killed after {done_before} of "
              f"{len(ids)} images and resumed by its retry; every batch indexed and re-classified "
              f"{settled_in:.0f}s after the start ({time.monotonic() - killed_at:.0f}s after the kill)")
    finally:
        object_store.forget_stores()
        for m in (daemon, code_server):
            m.stop()
