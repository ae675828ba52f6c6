"""Files under the data directory: names that fit whatever the batch's name, writes that leave the old
file and no temp file behind when they fail (a real full-file-size error from the OS), and temp files
of dead writers swept at the start of a step."""

import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_assets.classification.prompts import load_categories
from clip_assets.classification.steps import write_centroids, write_classifications
from clip_assets.config.layout import MAX_STEM_BYTES, DataLayout, batch_stem
from clip_assets.config.settings import REPO_ROOT
from clip_assets.definitions import build_definitions
from clip_assets.demo.shapes import write_collection
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.steps import write_embeddings
from clip_assets.ingest.manifest import image_paths
from clip_assets.ingest.steps import write_manifest
from clip_assets.search.exact_search import embedding_files, top_k_streaming
from clip_assets.storage.atomic_files import TEMP_MARKER, _host, temp_path_for, write_parquet_atomically
from clip_assets_tests.support.dagster_ticks import classification_counts, tick

NAME_MAX = os.pathconf("/", "PC_NAME_MAX")
LONG_BATCH = "b" * 250  # a folder name this long fits the file system; "<name>.parquet" would not


def name_bytes(path) -> int:
    return len(os.fsencode(path.name))


@pytest.mark.parametrize("name", ["x" * 255, "é" * 127, "batch-001.parquet", "a b~c.toml"])
def test_temp_names_fit_the_file_name_limit_whatever_the_target(tmp_path, name):
    tmp = temp_path_for(tmp_path / name)
    assert tmp.parent == tmp_path and tmp.name.startswith(TEMP_MARKER) and tmp.name.endswith(".tmp")
    assert name_bytes(tmp) < 150
    tmp.write_bytes(b"x")  # the file system takes it
    assert temp_path_for(tmp_path / name) != tmp  # unique per write


def test_batch_names_past_the_limit_get_a_short_stable_stem(tmp_path):
    layout = DataLayout(tmp_path)
    assert layout.manifest_path("batch-001").name == "batch-001.parquet"  # ordinary names are kept
    other = "b" * 249 + "c"  # same first 200 bytes as LONG_BATCH
    for name in (LONG_BATCH, other, "é" * 127):
        stem = batch_stem(name)
        assert len(os.fsencode(stem)) <= MAX_STEM_BYTES and batch_stem(stem) == stem
        for path in (layout.manifest_path(name), layout.embeddings_path(name), layout.embedding_parts_dir(name),
                     layout.embedding_failures_path(name), layout.search_rows_path(name)):
            assert name_bytes(path) <= NAME_MAX and path.stem == stem
    assert batch_stem(LONG_BATCH) != batch_stem(other)


def test_a_batch_with_a_250_character_name_is_listed_embedded_classified_and_searched(settings, clip, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    shutil.copytree(settings.image_root / "batch-001", root / LONG_BATCH)
    layout = DataLayout(settings.data_dir)
    write_centroids(clip, settings.prompts_dir, layout)
    manifest = write_manifest(root, layout, LONG_BATCH)
    embedded = write_embeddings(clip, root, layout, LONG_BATCH, EncodeOptions(batch_size=8, num_workers=0))
    classified = write_classifications(layout, LONG_BATCH)
    assert manifest.path.is_file() and embedded.rows == manifest.usable == 10
    assert classified.rows == 10 * len(load_categories(settings.prompts_dir))
    assert [b for b, *_ in classification_counts(settings)] == [LONG_BATCH]  # DuckDB keeps the whole name
    # search reports the file's stem as the batch, and the stem leads back to the batch's files
    hits = top_k_streaming(clip.encode_texts(["a red circle"]).numpy()[0], embedding_files(layout), k=3)
    assert {batch for _, _, batch in hits} == {batch_stem(LONG_BATCH)}
    assert embedding_files(layout, [LONG_BATCH]) == embedding_files(layout)
    paths = image_paths(layout, {hits[0][2]: [hits[0][1]]})
    assert paths[hits[0][1]].startswith(LONG_BATCH + "/")


def test_the_sensors_grouped_run_classifies_a_batch_with_a_250_character_name(settings, instance, tmp_path):
    root = tmp_path / "images"
    write_collection(root, batches=2, per_batch=4, seed=11)
    (root / "batch-002").rename(root / LONG_BATCH)
    ops_settings = settings.model_copy(update={"image_root": root})
    defs = build_definitions(ops_settings)
    first = tick(defs, instance, None)  # registers both, builds the centroids
    second = tick(defs, instance, first.cursor)  # one run for both batches; tick asserts it succeeded
    assert len(second.run_requests) == 1
    n_cats = len(load_categories(settings.prompts_dir))
    assert classification_counts(ops_settings) == [("batch-001", 4 * n_cats, 4 * n_cats), (LONG_BATCH, 4 * n_cats, 4 * n_cats)]


def table_of(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"image_id": [f"{seed}-{i}" for i in range(rows)], "value": rng.random(rows)})


def run_with_file_size_limit(limit_bytes: int, code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python whose files may not grow past limit_bytes (RLIMIT_FSIZE): a write
    past it fails with EFBIG, the error a full disk gives (ENOSPC) as far as the writer can tell."""
    prelude = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process at the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)


def test_a_write_that_runs_out_of_space_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "manifest" / "batch-001.parquet"
    write_parquet_atomically(table_of(10, seed=1), target)
    before = target.read_bytes()
    code = f"""
        import errno, sys
        import numpy as np, pyarrow as pa
        from pathlib import Path
        from clip_assets.storage.atomic_files import write_parquet_atomically, write_text_atomically
        rng = np.random.default_rng(2)
        big = pa.table({{"image_id": [str(i) for i in range(200_000)], "value": rng.random(200_000)}})
        for write in (lambda: write_parquet_atomically(big, Path({str(target)!r})),
                      lambda: write_text_atomically("x" * 2_000_000, Path({str(target)!r}))):
            try:
                write()
            except OSError as exc:
                print("failed", errno.errorcode.get(exc.errno, exc.errno) if exc.errno else exc)
            else:
                sys.exit("the write should have failed")
    """
    run = run_with_file_size_limit(256 * 1024, code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("failed") == 2, run.stdout
    assert "EFBIG" in run.stdout or "File too large" in run.stdout
    assert target.read_bytes() == before and pq.read_table(target).equals(table_of(10, seed=1))
    assert sorted(p.name for p in target.parent.iterdir()) == ["batch-001.parquet"]


def test_an_embedding_run_that_runs_out_of_space_leaves_no_temp_file(settings, clip, tmp_path):
    """The streaming writer of a batch's final embeddings file, in a real step, past the size limit:
    the 2-row part files fit under the limit, the 10-row batch file does not."""
    measured = DataLayout(tmp_path / "measure")
    write_manifest(settings.image_root, measured, "batch-001")
    write_embeddings(clip, settings.image_root, measured, "batch-001", EncodeOptions(batch_size=8, num_workers=0))
    final = pq.read_table(measured.embeddings_path("batch-001"))
    pq.write_table(final.slice(0, 2), tmp_path / "two-rows.parquet")
    part_size, final_size = (tmp_path / "two-rows.parquet").stat().st_size, measured.embeddings_path("batch-001").stat().st_size
    limit = (part_size + final_size) // 2
    assert part_size < limit < final_size

    layout = DataLayout(settings.data_dir)
    write_manifest(settings.image_root, layout, "batch-001")
    code = f"""
        from pathlib import Path
        from clip_assets.embedding.steps import write_embeddings
        from clip_assets.model.clip_model import load_clip_model
        from clip_assets.config.layout import DataLayout
        from clip_assets.embedding.options import EncodeOptions
        clip = load_clip_model("clip-assets-tiny", {settings.pretrained!r}, "cpu")
        try:
            write_embeddings(clip, Path({str(settings.image_root)!r}), DataLayout(Path({str(settings.data_dir)!r})),
                             "batch-001", EncodeOptions(batch_size=2, num_workers=0, chunk_rows=2))
        except OSError as exc:
            print("failed", exc)
    """
    run = run_with_file_size_limit(limit, code)
    assert run.returncode == 0, run.stderr
    assert "failed" in run.stdout, run.stdout
    assert [p for p in settings.data_dir.rglob("*") if TEMP_MARKER in p.name] == []
    assert not layout.embeddings_path("batch-001").exists()
    # the finished chunks are kept: the next run resumes from them instead of encoding again
    summary = write_embeddings(clip, settings.image_root, layout, "batch-001", EncodeOptions(batch_size=8, num_workers=0))
    assert summary.rows == 10 and summary.resumed == 10 and summary.encoded == 0


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def make_temp(folder, pid: int, host: str, age_s: float = 0.0):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TEMP_MARKER}~{pid}~{host}~0123abcd~batch-001.parquet.tmp"
    path.write_bytes(b"half a file")
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))
    return path


def test_stale_temp_files_are_swept_at_the_start_of_a_step(settings, tmp_path):
    layout = DataLayout(settings.data_dir)
    host = _host()
    dead = make_temp(layout.manifest_dir, dead_pid(), host)
    dead_in_parts = make_temp(layout.embedding_parts_dir("batch-001"), dead_pid(), host)
    live = make_temp(layout.manifest_dir, os.getppid(), host)  # a running writer: kept
    other_host_fresh = make_temp(layout.embeddings_dir, 4242, "another-node")  # maybe running there: kept
    other_host_old = make_temp(layout.embeddings_dir, 4243, "another-node", age_s=3 * 24 * 3600)
    unrelated = layout.manifest_dir / ".batch-001.parquet.tmp"
    unrelated.write_bytes(b"not ours")

    write_manifest(settings.image_root, layout, "batch-001")
    assert not dead.exists() and not other_host_old.exists()
    assert live.exists() and other_host_fresh.exists() and unrelated.exists()
    assert dead_in_parts.exists()  # a batch's parts are swept by that batch's embedding step
    assert layout.sweep_stale_temp_files("batch-001") == [dead_in_parts]
    assert live.exists()
