"""The Kubernetes and Postgres variant, loaded and validated without a cluster or a database."""


import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config

from clip_assets.config.settings import REPO_ROOT
from clip_assets_tests.support import postgres_server as pg

K8S_INSTANCE = REPO_ROOT / "deploy" / "dagster.k8s.yaml"
PG_ENV = {"DAGSTER_PG_USERNAME": "dagster", "DAGSTER_PG_PASSWORD": "secret", "DAGSTER_PG_HOST": "postgres",
          "DAGSTER_PG_DB": "dagster", "CLIP_ASSETS_IMAGE": "registry.example/clip-assets:1"}


@pytest.fixture
def k8s_env(monkeypatch, settings):
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CLIP_ASSETS_IMAGE_ROOT", str(settings.image_root))
    monkeypatch.setenv("CLIP_ASSETS_DATA_DIR", str(settings.data_dir))


def test_k8s_instance_config_passes_dagsters_schemas(k8s_env, tmp_path):
    (tmp_path / "dagster.yaml").write_text(K8S_INSTANCE.read_text())
    config, _ = dagster_instance_config(str(tmp_path))  # the instance schema, as `dagster` reads it
    from dagster_k8s import K8sRunLauncher
    from dagster_postgres import DagsterPostgresStorage

    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    checked = process_config(K8sRunLauncher.config_type(), launcher["config"])
    assert checked.success, checked.errors
    assert checked.value["job_image"] == "registry.example/clip-assets:1"  # env resolved
    checked = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert checked.success, checked.errors
    assert config["concurrency"]["pools"] == {"granularity": "op", "default_limit": 1}


@pytest.mark.postgres
def test_k8s_instance_storage_opens_a_real_postgres(k8s_env, postgres_server, monkeypatch, tmp_path):
    """The shipped storage block, its credentials from the environment as in the ConfigMap, on the
    tests' throwaway server (its port put in place of 5432): Dagster creates its tables and keeps a run."""
    database = postgres_server.new_database().rsplit("/", 1)[1]
    for name, value in {
        "DAGSTER_PG_USERNAME": pg.SUPERUSER,
        "DAGSTER_PG_PASSWORD": "",
        "DAGSTER_PG_HOST": postgres_server.host,
        "DAGSTER_PG_DB": database,
    }.items():
        monkeypatch.setenv(name, value)
    storage = yaml.safe_load(K8S_INSTANCE.read_text())["storage"]
    assert storage["postgres"]["postgres_db"]["port"] == 5432
    storage["postgres"]["postgres_db"]["port"] = postgres_server.port
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({"storage": storage}))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        run = instance.create_run_for_job(dg.GraphDefinition("noop").to_job())
        assert [r.run_id for r in instance.get_runs()] == [run.run_id]


def test_local_instance_config_is_queued_with_pools_of_one(tmp_path):
    (tmp_path / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["pools"]["default_limit"] == 1


def test_k8s_code_location_loads_and_sends_only_the_embedding_step_to_gpu_nodes(k8s_env):
    from dagster_k8s.job import UserDefinedDagsterK8sConfig, get_user_defined_k8s_config

    from clip_assets import definitions_k8s

    defs = definitions_k8s.defs
    job = defs.resolve_job_def("classify_image_batch")
    assert job.executor_def.name == "k8s"
    gpu_steps = {}
    for node in job.graph.node_dict.values():
        config = get_user_defined_k8s_config(node.definition.tags)
        assert isinstance(config, UserDefinedDagsterK8sConfig)
        limits = (config.container_config.get("resources") or {}).get("limits", {})
        gpu_steps[node.name] = limits.get("nvidia.com/gpu")
    assert gpu_steps == {"image_manifest": None, "image_embeddings": "1", "image_classifications": None}
    embed = job.graph.node_named("image_embeddings").definition
    assert embed.tags["clip_assets/gpu"] == "true"
    assert get_user_defined_k8s_config(embed.tags).pod_spec_config["node_selector"] == {"clip-assets/gpu": "true"}
    # the executor's own config is well-formed for dagster-k8s
    from dagster_k8s import k8s_job_executor

    checked = process_config(k8s_job_executor.config_schema.config_type, definitions_k8s.STEP_EXECUTOR_CONFIG)
    assert checked.success, checked.errors


SETTINGS_CONFIGMAP = REPO_ROOT / "deploy" / "clip-assets-settings.yaml"
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "DAGSTER_PG_PASSWORD")


def test_k8s_pods_get_buckets_the_parquet_warehouse_a_cache_of_their_own_and_no_credentials(k8s_env, monkeypatch):
    """deploy/clip-assets-settings.yaml is what every pod reads: the image root and the data directory in
    buckets, the parquet warehouse, the cache on an emptyDir that the run and step pods mount there; no
    credentials in any shipped file; and Settings takes the values as they are."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import UserDefinedDagsterK8sConfig, get_user_defined_k8s_config

    from clip_assets import definitions_k8s
    from clip_assets.config.settings import Settings

    [configmap] = yaml.safe_load_all(SETTINGS_CONFIGMAP.read_text())
    assert (configmap["kind"], configmap["metadata"]["name"]) == ("ConfigMap", "clip-assets-settings")
    data = configmap["data"]
    for text in (SETTINGS_CONFIGMAP.read_text(), K8S_INSTANCE.read_text()):
        assert not [line for line in text.splitlines()
                    if any(f"{name}:" in line or f"{name}=" in line for name in CREDENTIALS)
                    and not line.lstrip().startswith("#")]
    assert not set(data) & set(CREDENTIALS)

    for name, value in data.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    assert str(settings.image_root).startswith("s3://") and str(settings.data_dir).startswith("s3://")
    assert settings.warehouse == "parquet"

    launcher = yaml.safe_load(K8S_INSTANCE.read_text())["run_launcher"]["config"]
    executor = definitions_k8s.STEP_EXECUTOR_CONFIG
    assert launcher["env_config_maps"] == executor["env_config_maps"] == ["clip-assets-settings"]
    assert launcher["env_secrets"] == ["clip-assets-postgres"]
    # The embedding step's pod as dagster-k8s builds it: the run launcher's settings, the executor's, the op tag's.
    step = K8sContainerContext(env_config_maps=launcher["env_config_maps"], env_secrets=launcher["env_secrets"],
                               volumes=launcher["volumes"], volume_mounts=launcher["volume_mounts"])
    step = step.merge(K8sContainerContext(
        env_config_maps=executor["env_config_maps"],
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(executor["step_k8s_config"]),
    ))
    embed = definitions_k8s.defs.resolve_job_def("classify_image_batch").graph.node_named("image_embeddings")
    step = step.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(embed.definition.tags)))
    pod, container = step.run_k8s_config.pod_spec_config, step.run_k8s_config.container_config
    [volume] = pod["volumes"]
    [mount] = container["volume_mounts"]
    assert volume["empty_dir"] == {} and mount["name"] == volume["name"]
    assert mount["mount_path"] == str(settings.cache_dir)  # CLIP_ASSETS_CACHE_DIR is that emptyDir
    assert pod["node_selector"] == {"clip-assets/gpu": "true"}
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert {e.get("config_map_ref", {}).get("name") for e in container["env_from"]} >= {"clip-assets-settings"}
    assert {e.get("secret_ref", {}).get("name") for e in container["env_from"]} >= {"clip-assets-postgres"}
