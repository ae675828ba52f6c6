"""A run as users start it, `dagster asset materialize`, with what its start-up is made of.

The embedding step runs in the run's own process (no second import of torch and the code location
in a step subprocess) and its decode workers start; the run log says when its first images were
done. No timings are asserted: `benchmarks/peer_clip_retrieval.py` measures them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq

from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import REPO_ROOT
from clip_assets.ingest.steps import write_manifest
from clip_assets_tests.support.scratch_instance import SCRATCH_INSTANCE_YAML


def test_dagster_asset_materialize_encodes_in_the_runs_process(tmp_path, settings, collection, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(SCRATCH_INSTANCE_YAML.format(home=home))
    layout = DataLayout(settings.data_dir)
    write_manifest(collection, layout, "batch-001")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "CLIP_ASSETS_IMAGE_ROOT": str(collection),
        "CLIP_ASSETS_DATA_DIR": str(settings.data_dir),
        "CLIP_ASSETS_PROMPTS_DIR": str(settings.prompts_dir),
        "CLIP_ASSETS_MODEL": settings.model,
        "CLIP_ASSETS_PRETRAINED": settings.pretrained,
        "CLIP_ASSETS_DEVICE": "cpu",
        "CLIP_ASSETS_BATCH_SIZE": "4",  # 10 images: more than one batch, so the decode workers start
        "CLIP_ASSETS_NUM_WORKERS": "2",
    }
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("image_batches", ["batch-001"])
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "--select", "image_embeddings",
         "--partition", "batch-001", "-m", "clip_assets.definitions"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    with dg.DagsterInstance.get() as instance:
        (run,) = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS
        events = instance.all_logs(run.run_id)
    kinds = {e.dagster_event.event_type_value for e in events if e.dagster_event}
    messages = [e.user_message for e in events]
    assert "STEP_SUCCESS" in kinds
    assert "STEP_WORKER_STARTING" not in kinds  # no step subprocess
    assert any(m.startswith("Executing steps in process") for m in messages)
    assert any(m.startswith("first 4 images done") for m in messages)
    assert pq.read_metadata(layout.embeddings_path("batch-001")).num_rows == 10
