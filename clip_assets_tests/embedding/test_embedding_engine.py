"""The embedding engine: bad files, incremental re-encoding, DCT-scaled decoding, kill and resume."""

import io
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import REPO_ROOT
from clip_assets.demo.shapes import write_collection
from clip_assets.embedding.decode import decode_image, draft_size
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.steps import write_embeddings
from clip_assets.ingest.manifest import build_manifest, image_id_for
from clip_assets.ingest.steps import write_manifest
from clip_assets.model.clip_model import load_clip_model
from clip_assets.storage.arrow_vectors import vectors_matrix
from clip_assets_tests.support.images import jpeg_bytes, photo_like, write_bad_batch
from clip_assets_tests.support.models import TINY


def test_every_bad_file_is_recorded_and_the_batch_goes_on(tmp_path, clip):
    root = tmp_path / "images"
    cases = write_bad_batch(root)
    layout = DataLayout(tmp_path / "data")
    write_manifest(root, layout, "bad")
    manifest = {r["path"].split("/", 1)[1]: r for r in pq.read_table(layout.manifest_path("bad")).to_pylist()}
    (root / "bad" / "vanishes.jpg").unlink()
    (root / "bad" / "hangs.jpg").unlink()
    os.mkfifo(root / "bad" / "hangs.jpg")  # opening it blocks until someone writes: must time out

    summary = write_embeddings(clip, root, layout, "bad", EncodeOptions(batch_size=4, num_workers=2, file_timeout_s=3))
    embedded = {r["image_id"] for r in pq.read_table(layout.embeddings_path("bad")).to_pylist()}
    failures = {r["path"].split("/", 1)[1]: r["error"] for r in pq.read_table(layout.embedding_failures_path("bad")).to_pylist()}
    for name, outcome in cases.items():
        row = manifest[name]
        if outcome == "manifest":
            assert row["status"] in ("error", "skipped") and row["error"], name
        else:
            assert row["status"] == "ok", (name, row["error"])
        assert (image_id_for(f"bad/{name}") in embedded) == (outcome == "ok"), name
        assert (name in failures) == (outcome == "embedding"), (name, failures.get(name))
    assert "decompression bomb" in failures["bomb.png"]
    assert "outside" in manifest["link-outside.jpg"]["error"] and manifest["zero-byte.jpg"]["error"] == "empty file"
    for name in ("page.jpg", "notes.png"):  # said plainly, not as Pillow's text about an in-memory buffer
        assert failures[name].startswith("UnidentifiedImageError: cannot identify image file (not an image"), failures
        assert "BytesIO" not in failures[name]
    assert failures["header-only.png"]
    assert "truncated" in failures["truncated.jpg"] and "FileNotFoundError" in failures["vanishes.jpg"]
    assert "gave up after 3 s" in failures["hangs.jpg"]
    assert summary.failed == sum(o == "embedding" for o in cases.values())
    assert summary.rows == sum(o == "ok" for o in cases.values())


def _manifest_as_nobody(root: Path, conn) -> None:
    os.setuid(65534)
    conn.send(build_manifest(root, "b").to_pylist())


def test_unreadable_file_is_recorded():
    root = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        os.chmod(root, 0o755)
        (root / "b").mkdir(mode=0o755)
        photo_like(60, 40).save(root / "b" / "fine.jpg")
        photo_like(60, 40).save(root / "b" / "secret.jpg")
        os.chmod(root / "b" / "fine.jpg", 0o644)
        os.chmod(root / "b" / "secret.jpg", 0o000)
        if os.geteuid() == 0:  # root reads anything: list the batch as an ordinary user
            parent, child = multiprocessing.get_context("fork").Pipe()
            proc = multiprocessing.get_context("fork").Process(target=_manifest_as_nobody, args=(root, child))
            proc.start()
            rows = {r["path"]: r for r in parent.recv()}
            proc.join()
        else:
            rows = {r["path"]: r for r in build_manifest(root, "b").to_pylist()}
        assert rows["b/fine.jpg"]["status"] == "ok"
        assert rows["b/secret.jpg"]["status"] == "error" and "Permission" in rows["b/secret.jpg"]["error"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_odd_modes_decode_to_sensible_rgb():
    sixteen = io.BytesIO()
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(sixteen, "PNG")
    assert decode_image(sixteen.getvalue()).getpixel((0, 0)) == (127, 127, 127)  # not clipped to white
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=1)
    assert decode_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    frames = [Image.new("RGB", (8, 8), (0, 200, 0)), Image.new("RGB", (8, 8), (200, 0, 0))]
    anim = io.BytesIO()
    frames[0].save(anim, "GIF", save_all=True, append_images=frames[1:])
    r, g, b = decode_image(anim.getvalue()).getpixel((2, 2))
    assert g > 150 and r < 50  # the first frame
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated = jpeg_bytes(Image.new("RGB", (40, 20)), exif=exif.tobytes())
    assert decode_image(rotated).size == (20, 40)


@pytest.mark.parametrize("size", [(4000, 3000), (1600, 1200), (640, 480)])
def test_dct_scaling_stays_within_the_resize_error(clip, size):
    """A large JPEG decoded at reduced DCT scale, then resized by the model, against full decoding.

    The yardstick is the resize's own error: how much the model's input changes when its bicubic
    resize is swapped for a bilinear one. Reduced-scale decoding must stay well inside it.
    """
    data = jpeg_bytes(photo_like(*size, seed=5), quality=92)
    full = decode_image(data)
    scaled = decode_image(data, draft_size(clip))
    assert min(scaled.size) >= 2 * min(clip.input_size)
    if size[0] >= 4 * draft_size(clip)[0]:
        assert scaled.size[0] < full.size[0]  # it really decoded less
    side = min(clip.input_size)
    ratio = side / min(full.size)
    bilinear = full.resize((round(full.width * ratio), round(full.height * ratio)), Image.BILINEAR)
    reference = clip.preprocess(full)
    resize_error = (reference - clip.preprocess(bilinear)).abs().mean().item()
    draft_error = (reference - clip.preprocess(scaled)).abs().mean().item()
    assert draft_error <= 0.25 * resize_error, (draft_error, resize_error)


def test_rematerializing_encodes_only_new_or_changed_images(tmp_path, clip, other_checkpoint):
    root = tmp_path / "images"
    write_collection(root, batches=1, per_batch=12, seed=3)
    layout = DataLayout(tmp_path / "data")
    write_manifest(root, layout, "batch-001")
    first = write_embeddings(clip, root, layout, "batch-001", EncodeOptions(batch_size=4, num_workers=0))
    assert (first.encoded, first.carried_over, first.rows) == (12, 0, 12)
    before = pq.read_table(layout.embeddings_path("batch-001"))
    files = sorted((root / "batch-001").glob("img-*"))
    photo_like(96, 96, 9).save(files[0])  # changed content
    os.utime(files[1], (time.time() + 50, time.time() + 50))  # touched, same content
    files[2].unlink()  # deleted
    photo_like(96, 96, 10).save(root / "batch-001" / "new.png")  # added
    write_manifest(root, layout, "batch-001")
    second = write_embeddings(clip, root, layout, "batch-001", EncodeOptions(batch_size=4, num_workers=0))
    assert (second.encoded, second.unchanged_content, second.carried_over, second.dropped) == (2, 1, 9, 1)
    after = pq.read_table(layout.embeddings_path("batch-001"))
    ids = after["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 12
    old = dict(zip(before["image_id"].to_pylist(), vectors_matrix(before["embedding"])))
    new = dict(zip(ids, vectors_matrix(after["embedding"])))
    touched = image_id_for(f"batch-001/{files[1].name}")
    assert np.array_equal(new[touched], old[touched])
    assert not np.allclose(new[image_id_for(f"batch-001/{files[0].name}")], old[image_id_for(f"batch-001/{files[0].name}")])
    assert image_id_for(f"batch-001/{files[2].name}") not in new
    other = write_embeddings(load_clip_model(TINY, str(other_checkpoint), "cpu"), root, layout, "batch-001", EncodeOptions(batch_size=4, num_workers=0))
    assert (other.encoded, other.carried_over) == (12, 0)


KILLED_RUN = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from clip_assets.embedding.steps import write_embeddings
    from clip_assets.model.clip_model import load_clip_model
    from clip_assets.config.layout import DataLayout
    from clip_assets.embedding.options import EncodeOptions
    clip = load_clip_model("clip-assets-tiny", sys.argv[1], "cpu")
    write_embeddings(clip, Path(sys.argv[2]), DataLayout(Path(sys.argv[3])), "batch-001",
                     EncodeOptions(batch_size=4, num_workers=0, chunk_rows=8))
    """
)


def test_a_killed_run_resumes_from_its_last_chunk(tmp_path, clip, checkpoint):
    root = tmp_path / "images"
    write_collection(root, batches=1, per_batch=240, seed=11)
    layout = DataLayout(tmp_path / "data")
    write_manifest(root, layout, "batch-001")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(checkpoint), str(root), str(layout.data_dir)],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    parts_dir = layout.embedding_parts_dir("batch-001")
    deadline = time.monotonic() + 120
    while len(list(parts_dir.glob("part-*.parquet"))) < 3:
        assert proc.poll() is None, "the run finished before it could be killed: make the batch larger"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not layout.embeddings_path("batch-001").exists()
    done_before = sum(pq.read_metadata(p).num_rows for p in parts_dir.glob("part-*.parquet"))

    summary = write_embeddings(clip, root, layout, "batch-001", EncodeOptions(batch_size=4, num_workers=0, chunk_rows=8))
    assert summary.resumed == done_before >= 24
    assert summary.encoded == 240 - done_before
    table = pq.read_table(layout.embeddings_path("batch-001"))
    ids = table["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 240 and not parts_dir.exists()
    # The resumed rows are the same vectors a fresh run computes.
    fresh = DataLayout(tmp_path / "fresh")
    write_manifest(root, fresh, "batch-001")
    write_embeddings(clip, root, fresh, "batch-001", EncodeOptions(batch_size=4, num_workers=0))
    reference = pq.read_table(fresh.embeddings_path("batch-001"))
    ref = dict(zip(reference["image_id"].to_pylist(), vectors_matrix(reference["embedding"])))
    for image_id, vector in zip(ids, vectors_matrix(table["embedding"])):
        np.testing.assert_allclose(vector, ref[image_id], atol=1e-5)
    print(f"killed after {done_before} of 240 images; resumed run encoded {summary.encoded}")


@pytest.fixture
def crashing_decoder():
    """The test-only Pillow format whose decoder aborts, in this process and the workers it forks."""
    from clip_assets_tests.support import crashing_decoder as plugin

    plugin.register()
    yield plugin
    plugin.unregister()


def without_the_text_file(batch_dir: Path) -> None:
    """The generated collection's last batch holds a text file named .png, which the embedding step
    records as a failure: tests of other failures take it out first."""
    (batch_dir / "notes-not-an-image.png").unlink(missing_ok=True)


def usable_ids(layout: DataLayout, batch: str) -> set[str]:
    table = pq.read_table(layout.manifest_path(batch))
    return {r["image_id"] for r in table.to_pylist() if r["status"] == "ok"}


def test_a_decoder_that_kills_its_worker_costs_only_its_file(tmp_path, clip, crashing_decoder):
    """Files whose decoder aborts (SIGABRT, a real worker death) are recorded; every other image is encoded once."""
    root = tmp_path / "images"
    write_collection(root, batches=1, per_batch=30, seed=4)
    # First, last, in the middle, and two side by side (the same DataLoader batch of 4).
    culprits = ["a-first.png", "img-0012-crash.png", "img-0020-a.png", "img-0020-b.png", "z-last.png"]
    for name in culprits:
        (root / "batch-001" / name).write_bytes(crashing_decoder.crashing_file_bytes())
    without_the_text_file(root / "batch-001")
    layout = DataLayout(tmp_path / "data")
    write_manifest(root, layout, "batch-001")
    usable = usable_ids(layout, "batch-001")
    culprit_ids = {image_id_for(f"batch-001/{name}") for name in culprits}
    assert culprit_ids <= usable  # the header parses: only decoding crashes

    summary = write_embeddings(clip, root, layout, "batch-001", EncodeOptions(batch_size=4, num_workers=2, chunk_rows=8))
    failures = pq.read_table(layout.embedding_failures_path("batch-001")).to_pylist()
    assert {r["image_id"]: r["error"] for r in failures} == dict.fromkeys(
        culprit_ids, "decoder crashed the worker process (signal SIGABRT)")
    ids = pq.read_table(layout.embeddings_path("batch-001"))["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == usable - culprit_ids
    assert (summary.encoded, summary.failed, summary.rows) == (len(usable) - 5, 5, len(usable) - 5)
    assert not layout.embedding_parts_dir("batch-001").exists()


def test_a_worker_death_no_file_explains_stops_with_the_suspect_named(tmp_path, clip, crashing_decoder):
    """A worker that dies on a file that decodes fine on its own: a clear error naming it, not a restart
    loop, and whatever was done is kept in part files for the next run."""
    root = tmp_path / "images"
    write_collection(root, batches=1, per_batch=24, seed=5)
    (root / "batch-001" / "img-0010-odd.png").write_bytes(crashing_decoder.crashing_file_bytes(worker_only=True))
    layout = DataLayout(tmp_path / "data")
    write_manifest(root, layout, "batch-001")
    usable = usable_ids(layout, "batch-001")

    with pytest.raises(RuntimeError, match="no file can be blamed") as raised:
        write_embeddings(clip, root, layout, "batch-001", EncodeOptions(batch_size=4, num_workers=2, chunk_rows=1000))
    assert "batch-001/img-0010-odd.png" in str(raised.value)
    parts = layout.embedding_parts_dir("batch-001").glob("part-*.parquet")
    kept = [i for p in parts for i in pq.read_table(p)["image_id"].to_pylist()]
    assert len(kept) == len(set(kept)) and set(kept) <= usable - {image_id_for("batch-001/img-0010-odd.png")}
    print(f"\nstopped with {len(kept)} of {len(usable)} images kept in part files")


def test_the_file_time_limit_holds_off_the_main_thread(tmp_path, clip):
    """With 0 workers the files are read on the calling thread; SIGALRM only works on a main thread."""
    root = tmp_path / "images"
    write_collection(root, batches=1, per_batch=6, seed=6)
    without_the_text_file(root / "batch-001")
    layout = DataLayout(tmp_path / "data")
    write_manifest(root, layout, "batch-001")
    fifo = root / "batch-001" / "img-0001.jpg"
    fifo.unlink()
    os.mkfifo(fifo)  # listed as a usable image; reading it now blocks until someone writes
    outcome = {}

    def encode():
        try:
            outcome["summary"] = write_embeddings(clip, root, layout, "batch-001", EncodeOptions(batch_size=4, num_workers=0, file_timeout_s=2))
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=encode)
    thread.start()
    thread.join(300)
    try:
        assert not thread.is_alive() and "error" not in outcome, outcome
        summary = outcome["summary"]
        failures = {r["path"]: r["error"] for r in pq.read_table(layout.embedding_failures_path("batch-001")).to_pylist()}
        assert failures == {"batch-001/img-0001.jpg": "FileTimeout: gave up after 2 s (file blocked or too slow to decode)"}
        assert summary.rows == summary.encoded == len(usable_ids(layout, "batch-001")) - 1
    finally:  # release the read left blocked on the FIFO
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_finished_rows_are_written_by_elapsed_time_as_well_as_by_count(tmp_path, clip):
    """A slow model never holds more than flush_interval_s of work unwritten, however large a chunk is."""
    from clip_assets.embedding.engine import encode_images
    from clip_assets.embedding.store import PartFiles, plan_encoding

    root, layout = tmp_path / "images", DataLayout(tmp_path / "data")
    write_collection(root, batches=1, per_batch=24, seed=5)
    without_the_text_file(root / "batch-001")
    write_manifest(root, layout, "batch-001")
    manifest = pq.read_table(layout.manifest_path("batch-001"))
    job = plan_encoding(manifest, None, PartFiles(layout.embedding_parts_dir("batch-001"), clip.identity, "float32")).job
    n = len(job.image_ids)
    written = {}
    for interval in (3600.0, 1e-9):
        chunks = []
        encode_images(clip, root, job, chunks.append, EncodeOptions(batch_size=4, num_workers=0, chunk_rows=10**6, flush_interval_s=interval))
        written[interval] = [c.num_rows for c in chunks]
    assert written[3600.0] == [n]  # neither the count nor the time was reached: one write at the end
    assert written[1e-9] == [4] * (n // 4) + ([n % 4] if n % 4 else [])  # every model batch is past the time
