"""Every reader and writer of the DuckDB file goes through the warehouse's `connect`, which waits for
another process's lock and then says who holds it. The other process here is real: a Python process
(a stand-in for a person's notebook) holding a read-write or a read-only connection."""

import contextlib
import os
import re
import subprocess
import sys
import threading

import pytest

from clip_assets import checks
from clip_assets.classification.prompts import load_categories
from clip_assets.classification.steps import write_centroids, write_classifications
from clip_assets.config.settings import REPO_ROOT
from clip_assets.definitions import build_definitions
from clip_assets.defs.conventions import DUCKDB_READER, DUCKDB_WRITER, DUCKDB_WRITER_POOL
from clip_assets.demo.run import category_summary, matched_labels
from clip_assets.demo.shapes import LABELS_FILE
from clip_assets.pages.gallery import gallery_rows
from clip_assets.search.query import images_matching_category
from clip_assets.storage import warehouse
from clip_assets.storage.warehouse import WarehouseLockedError, read_centroids
from clip_assets.tuning.calibration import load_labelled_scores
from clip_assets.tuning.labels_file import read_labels_file
from clip_assets_tests.support.models import TINY
from clip_assets_tests.support.warehouse_oracles import score_histograms, top_images

NOTEBOOK = """
import sys, duckdb
con = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == "read-only")
print("holding", flush=True)
sys.stdin.readline()
con.close()
print("released", flush=True)
sys.stdin.readline()
"""


class Holder:
    """Another process holding the DuckDB file open until released."""

    def __init__(self, script, db, mode):
        self.proc = subprocess.Popen([sys.executable, str(script), str(db), mode],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "holding"
        self.pid = self.proc.pid

    def release(self):
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "released"


@pytest.fixture
def hold(tmp_path):
    script = tmp_path / "notebook_stand_in.py"
    script.write_text(NOTEBOOK)
    holders = []

    @contextlib.contextmanager
    def held(db, mode):
        holder = Holder(script, db, mode)
        holders.append(holder)
        yield holder

    yield held
    for holder in holders:
        holder.proc.stdin.close()
        holder.proc.wait(timeout=60)


def readers(settings, layout):
    """Every function that reads the DuckDB file, each called as its callers call it."""
    labels = read_labels_file(settings.image_root / LABELS_FILE)
    categories = load_categories(settings.prompts_dir)
    return {
        "read_centroids": lambda: read_centroids(layout.duckdb_path).categories,
        "top_images": lambda: top_images(layout.duckdb_path, "batch-001"),
        "score_histograms": lambda: score_histograms(layout.duckdb_path, "batch-001"),
        "gallery_rows": lambda: gallery_rows(layout, 3, 2),
        "calibration labelled scores": lambda: load_labelled_scores(layout, labels).image_ids,
        "search category filter": lambda: images_matching_category(layout, categories[0].name),
        "check: centroids": lambda: checks.every_category_has_centroids(layout.duckdb_path, categories).passed,
        "check: rows": lambda: checks.one_row_per_image_and_category(layout, "batch-001").passed,
        "check: same model": lambda: checks.embeddings_match_centroid_model(layout, "batch-001").passed,
        "demo summary": lambda: category_summary(layout),
        "demo matched labels": lambda: matched_labels(layout),
    }


def test_while_a_process_writes_every_reader_fails_after_the_wait_naming_it(settings, classified, hold, monkeypatch):
    monkeypatch.setattr(warehouse, "lock_wait_s", 0.3)
    calls = readers(settings, classified)
    with hold(classified.duckdb_path, "read-write") as writer:
        for name, read in calls.items():
            with pytest.raises(WarehouseLockedError) as err:
                read()
            message = str(err.value)
            assert f"PID {writer.pid} (" in message and "notebook_stand_in.py" in message, name
            assert str(classified.duckdb_path) in message and "CLIP_ASSETS_DUCKDB_WAIT_S" in message, name
        writer.release()
        assert all(read() is not None for read in calls.values())


def test_read_only_holders_let_readers_in_and_keep_writers_out(settings, classified, clip, hold, monkeypatch):
    monkeypatch.setattr(warehouse, "lock_wait_s", 0.3)
    calls = readers(settings, classified)
    alone = {name: read() for name, read in calls.items()}
    rows_before = top_images(classified.duckdb_path, "batch-002", per_category=1000)
    with hold(classified.duckdb_path, "read-only") as notebook:
        assert {name: read() for name, read in calls.items()} == alone  # DuckDB allows many readers
        for write in (lambda: write_classifications(classified, "batch-002"),
                      lambda: write_centroids(clip, settings.prompts_dir, classified)):
            with pytest.raises(WarehouseLockedError, match=rf"PID {notebook.pid} \(.*notebook_stand_in\.py"):
                write()
    assert top_images(classified.duckdb_path, "batch-002", per_category=1000) == rows_before


@pytest.mark.parametrize("mode", ["read-write", "read-only"])
def test_a_blocked_step_waits_and_succeeds_once_the_holder_lets_go(settings, classified, hold, monkeypatch, mode):
    """A writer waits out a notebook's read-only connection; a reader waits out a writer."""
    monkeypatch.setattr(warehouse, "lock_wait_s", 120)
    blocked = (lambda: read_centroids(classified.duckdb_path).categories) if mode == "read-write" else (
        lambda: write_classifications(classified, "batch-002").rows)
    expected = blocked()
    outcome = {}
    with hold(classified.duckdb_path, mode) as holder:
        step = threading.Thread(target=lambda: outcome.update(result=blocked()))
        step.start()
        step.join(timeout=1.0)
        assert step.is_alive()  # still waiting for the lock
        holder.release()
        step.join(timeout=120)
    assert outcome == {"result": expected}


def test_search_by_category_during_a_write_fails_in_one_paragraph_naming_the_writer(settings, classified, hold):
    category = load_categories(settings.prompts_dir)[0].name
    env = {**os.environ, "CLIP_ASSETS_IMAGE_ROOT": str(settings.image_root), "CLIP_ASSETS_DATA_DIR": str(settings.data_dir),
           "CLIP_ASSETS_MODEL": TINY, "CLIP_ASSETS_PRETRAINED": settings.pretrained, "CLIP_ASSETS_DEVICE": "cpu",
           "CLIP_ASSETS_DUCKDB_WAIT_S": "1"}
    with hold(classified.duckdb_path, "read-write") as writer:
        run = subprocess.run([sys.executable, "-m", "clip_assets.cli", "search", "a red circle", "--category", category],
                             env=env, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert f"PID {writer.pid} (" in run.stderr and "notebook_stand_in.py" in run.stderr


# Tests that open the file as another tool does: a person's notebook holding it in the test's own process;
# and the benchmark whose DuckLake side runs DuckDB 1.5 in a venv of its own, where the package is not installed.
OUTSIDE_TOOLS = ["clip_assets_tests/storage/test_duckdb_1x_readers.py", "benchmarks/writers_on_a_store.py"]


def test_only_the_warehouse_module_opens_the_duckdb_file():
    openers = [
        path.relative_to(REPO_ROOT).as_posix()
        for folder in ("clip_assets", "clip_assets_tests", "benchmarks")
        for path in (REPO_ROOT / folder).rglob("*.py")
        if re.search(r"duckdb\.connect\(", path.read_text(encoding="utf-8").replace(NOTEBOOK, ""))
    ]
    # warehouse_schema.scratch opens an in-memory DuckDB, never a file: the parquet warehouse's views run in it.
    assert sorted(openers) == sorted(["clip_assets/storage/warehouse.py", "clip_assets/storage/warehouse_schema.py",
                                      *OUTSIDE_TOOLS])


def test_assets_declare_what_they_do_with_the_duckdb_file(settings):
    access = {}
    for assets_def in build_definitions(settings).assets:
        for spec in assets_def.specs:
            mode = spec.tags.get("clip_assets/duckdb")
            if mode:
                access[spec.key.to_user_string()] = (mode, assets_def.op.pool)
    writers = {k for k, (mode, _) in access.items() if mode == DUCKDB_WRITER["clip_assets/duckdb"]}
    readers_ = {k for k, (mode, _) in access.items() if mode == DUCKDB_READER["clip_assets/duckdb"]}
    assert writers == {"prompt_centroids", "image_classifications", "near_duplicates"}
    assert all(access[k][1] == DUCKDB_WRITER_POOL for k in writers)  # one writer at a time
    assert readers_ == {"image_embeddings", "category_adapters", "image_evaluation", "threshold_calibration",
                        "classification_gallery"}
    assert all(access[k][1] != DUCKDB_WRITER_POOL for k in readers_)  # readers never wait for a writer slot
