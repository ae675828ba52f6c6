"""Shared fixtures: a real tiny open_clip checkpoint, a generated image collection, temp settings.

Nothing here is mocked: the model is the project's tiny architecture with weights initialised from a
fixed seed and saved as a real checkpoint; DuckDB files and Dagster instances live in temp dirs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest

from clip_assets.classification.steps import write_centroids, write_classifications
from clip_assets.config import accepted_warnings
from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import REPO_ROOT, Settings
from clip_assets.demo.shapes import write_collection
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.steps import write_embeddings
from clip_assets.ingest.steps import write_manifest
from clip_assets.model.clip_model import ClipModel, load_clip_model
from clip_assets_tests.support import postgres_server as pg
from clip_assets_tests.support.models import TINY, save_random_checkpoint, seeded_vit_s_32
from clip_assets_tests.support.s3_server import s3_server, s3_store  # noqa: F401 (fixtures: an S3 server on loopback)
from clip_assets_tests.support.shell_environment import settings_environment

BATCHES = ["batch-001", "batch-002"]

accepted_warnings.ignore()


def pytest_configure(config):
    for line in accepted_warnings.pytest_filters():
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-seed0.pt", seed=0)


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory) -> Path:
    """Same architecture, other weights: a different model identity."""
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-seed1.pt", seed=1)


@pytest.fixture(scope="session")
def clip(checkpoint):
    return load_clip_model(TINY, str(checkpoint), "cpu")


@pytest.fixture(scope="module")
def vit_s_32() -> ClipModel:
    """ViT-S-32 with seeded random weights (clip_assets_tests.support.models.seeded_vit_s_32)."""
    return seeded_vit_s_32()


@pytest.fixture(scope="session")
def collection(tmp_path_factory) -> Path:
    """Two batches of 10 generated images; batch-002 also holds an empty and a text 'image'."""
    root = tmp_path_factory.mktemp("images")
    write_collection(root, batches=2, per_batch=10, seed=7)
    return root


@pytest.fixture
def settings(tmp_path, collection, checkpoint) -> Settings:
    prompts = tmp_path / "prompts"
    shutil.copytree(REPO_ROOT / "prompts", prompts)
    return Settings(
        image_root=collection,
        data_dir=tmp_path / "data",
        prompts_dir=prompts,
        model=TINY,
        pretrained=str(checkpoint),
        device="cpu",
        batch_size=8,
        num_workers=0,
    )


@pytest.fixture
def cli_env(monkeypatch):
    """Points the CLIP_ASSETS_* variables at a Settings, as a user's shell would for the command line."""

    def point_at(settings: Settings) -> Settings:
        for name, value in settings_environment(settings).items():
            monkeypatch.setenv(name, value)
        return settings

    return point_at


@pytest.fixture
def instance(tmp_path):
    """A real Dagster instance (sqlite storage) in a temp dir."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        yield instance


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway Postgres server for the whole session (clip_assets_tests/support/postgres_server.py)."""
    server = pg.start()
    yield server
    server.stop()


@pytest.fixture(params=pg.STORAGES)
def instance_storage(request) -> dict | None:
    """A test instance's `storage:` config: None (SQLite files in the instance's folder, Dagster's default),
    then a fresh database on the session's Postgres server."""
    if request.param == "sqlite":
        return None
    return pg.storage_config(request.getfixturevalue("postgres_server").new_database())


@pytest.fixture
def instance_on_each_storage(tmp_path, instance_storage):
    """The `instance` fixture's real Dagster instance, on SQLite and then on Postgres."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    overrides = {"storage": instance_storage} if instance_storage else None
    with dg.instance_for_test(temp_dir=str(home), overrides=overrides) as instance:
        yield instance


@pytest.fixture
def classified(settings, clip) -> DataLayout:
    """Both batches listed, embedded and classified against the repo's prompt files, without Dagster."""
    layout = DataLayout(settings.data_dir)
    write_centroids(clip, settings.prompts_dir, layout)
    for batch in BATCHES:
        write_manifest(settings.image_root, layout, batch)
        write_embeddings(clip, settings.image_root, layout, batch, EncodeOptions(batch_size=8, num_workers=0))
        write_classifications(layout, batch)
    return layout
