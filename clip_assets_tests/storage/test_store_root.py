"""The image root in a bucket: on moto's S3 server on loopback, a batch lists and embeds exactly as the
same files on a local disk; an object that vanishes or is not an image is a failure with its reason and
the batch goes on; a missing bucket, missing credentials or a missing backend is one clear line."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import Settings
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.steps import write_embeddings
from clip_assets.ingest.batch_discovery import DiscoveryCursor, changed_batches, discover_new_batches
from clip_assets.ingest.content_check import content_check_slice
from clip_assets.ingest.manifest import build_manifest, image_id_for, list_batches
from clip_assets.ingest.steps import write_manifest
from clip_assets.storage.arrow_vectors import vectors_matrix
from clip_assets.storage.store_root import StoreRoot, image_root_from
from clip_assets.storage.store_urls import StoreError
from clip_assets_tests.support.images import jpeg_bytes, photo_like
from clip_assets_tests.support.s3_server import upload


def write_local_batches(root: Path) -> None:
    """Two batches: photos at two depths, a PNG, an empty file, a text 'image', dotfiles that are left out."""
    for b, batch in enumerate(("b-one", "b-two")):
        folder = root / batch
        (folder / "sub" / "deeper").mkdir(parents=True)
        for k in range(4):
            (folder / f"photo-{k}.jpg").write_bytes(jpeg_bytes(photo_like(96 + 8 * k, 72, seed=10 * b + k)))
        (folder / "sub" / "a.jpg").write_bytes(jpeg_bytes(photo_like(80, 80, seed=50 + b)))
        png = io.BytesIO()
        photo_like(64, 48, seed=60 + b).save(png, "PNG")
        (folder / "sub" / "deeper" / "z.png").write_bytes(png.getvalue())
        (folder / "empty.jpg").write_bytes(b"")
        (folder / "notes.jpg").write_bytes(b"not an image\n")
        (folder / ".hidden.jpg").write_bytes(jpeg_bytes(photo_like(40, 40)))
    (root / ".cache").mkdir()
    (root / ".cache" / "x.jpg").write_bytes(b"x")


def without_mtime(table) -> list[dict]:
    return table.drop_columns(["mtime"]).to_pylist()


def test_a_batch_in_a_bucket_lists_and_embeds_as_on_a_local_disk(tmp_path, s3_store, clip):
    local = tmp_path / "images"
    write_local_batches(local)
    store = upload(local, s3_store, "collection/images")

    assert list_batches(store) == list_batches(local) == ["b-one", "b-two"]
    before = store.requests.snapshot()
    manifest = build_manifest(store, "b-one")
    assert store.requests.since(before) == {"LIST": 1}  # one LIST pass for the batch
    assert without_mtime(manifest) == without_mtime(build_manifest(local, "b-one"))  # same ids, order, statuses
    assert manifest.to_pylist()[0]["mtime"] > 1e9  # the object's LastModified
    assert {r["path"]: r["error"] for r in manifest.to_pylist() if r["status"] != "ok"} == {
        "b-one/empty.jpg": "empty file"
    }

    options = EncodeOptions(batch_size=4, num_workers=2, file_timeout_s=20)
    embedded = {}
    for name, root in (("local", local), ("store", store)):
        layout = DataLayout(tmp_path / f"data-{name}")
        write_manifest(root, layout, "b-one")
        before = store.requests.snapshot()
        summary = write_embeddings(clip, root, layout, "b-one", options)
        if name == "store":  # each usable object read with one GET, in the forked decode workers
            assert store.requests.since(before) == {"GET": summary.usable}
        table = pq.read_table(layout.embeddings_path("b-one"))
        embedded[name] = (table, summary, pq.read_table(layout.embedding_failures_path("b-one")).to_pylist())
    (local_table, local_summary, local_failures), (store_table, store_summary, store_failures) = embedded.values()
    assert store_table["image_id"].to_pylist() == local_table["image_id"].to_pylist()
    assert len(store_table) == 6 and store_summary.encoded == local_summary.encoded == 6
    np.testing.assert_allclose(
        vectors_matrix(store_table["embedding"]), vectors_matrix(local_table["embedding"]), atol=1e-5
    )
    assert store_table["fingerprint"].to_pylist() == local_table["fingerprint"].to_pylist()
    assert store_table["perceptual_hash"].to_pylist() == local_table["perceptual_hash"].to_pylist()
    assert store_failures == local_failures and [f["path"] for f in store_failures] == ["b-one/notes.jpg"]


def test_an_object_that_vanishes_or_is_corrupt_is_a_failure_and_the_rest_are_embedded(tmp_path, s3_store, clip):
    fs = s3_store.filesystem()
    names = [f"img-{k}.jpg" for k in range(6)]
    for k, name in enumerate(names):
        fs.pipe(f"{s3_store.bucket}/root/batch/{name}", jpeg_bytes(photo_like(90, 70, seed=k)))
    good = jpeg_bytes(photo_like(300, 200, seed=9))
    fs.pipe(f"{s3_store.bucket}/root/batch/corrupt.jpg", good[: len(good) // 3])
    store = image_root_from(s3_store.url("root"))
    layout = DataLayout(tmp_path / "data")
    write_manifest(store, layout, "batch")
    fs.rm(f"{s3_store.bucket}/root/batch/img-2.jpg")  # deleted between the listing and the embedding

    for workers in (2, 0):  # forked decode workers, and the calling process
        summary = write_embeddings(clip, store, layout, "batch", EncodeOptions(batch_size=4, num_workers=workers))
        failures = {r["path"]: r["error"] for r in pq.read_table(layout.embedding_failures_path("batch")).to_pylist()}
        assert set(failures) == {"batch/img-2.jpg", "batch/corrupt.jpg"}
        assert failures["batch/img-2.jpg"].startswith("FileNotFoundError: ")
        assert f"{s3_store.url('root')}/batch/img-2.jpg: no such object" in failures["batch/img-2.jpg"]
        assert "OSError" in failures["batch/corrupt.jpg"] or "truncated" in failures["batch/corrupt.jpg"].lower()
        embedded = set(pq.read_table(layout.embeddings_path("batch"))["image_id"].to_pylist())
        assert embedded == {image_id_for(f"batch/{n}") for n in names if n != "img-2.jpg"}
        assert summary.failed == 2
        layout.embeddings_path("batch").unlink()  # the next round encodes them again


def test_the_discovery_sensor_and_the_rescan_see_the_bucket_as_it_is_now(tmp_path, s3_store):
    fs = s3_store.filesystem()

    def put(key: str, data: bytes) -> None:
        fs.pipe(f"{s3_store.bucket}/imgs/{key}", data)

    put("first/a.jpg", b"a-bytes")
    store = StoreRoot(s3_store.url("imgs"))
    asked = []

    def known():
        asked.append(1)
        return []

    found = discover_new_batches(store, known, DiscoveryCursor())
    assert found.new == ["first"] and found.listed
    again = discover_new_batches(store, known, found.cursor)
    assert not again.listed and len(asked) == 1  # nothing new under the prefix: the instance is not asked
    put("second/b.jpg", b"b-bytes")
    assert discover_new_batches(store, lambda: ["first"], again.cursor).new == ["second"]

    layout = DataLayout(tmp_path / "data")
    for batch in ("first", "second"):
        write_manifest(store, layout, batch)
    assert changed_batches(store, layout, ["first", "second", "gone"]) == []
    put("second/b.jpg", b"other bytes")  # rewritten: another size and LastModified
    put("first/.hidden", b"left out")  # a dotfile changes nothing
    assert changed_batches(store, layout, ["first", "second"]) == ["second"]


def test_the_content_check_reads_objects_from_the_store(tmp_path, s3_store, clip):
    fs = s3_store.filesystem()
    fs.pipe(f"{s3_store.bucket}/r/batch/a.jpg", jpeg_bytes(photo_like(64, 64, seed=1)))
    store = StoreRoot(s3_store.url("r"))
    layout = DataLayout(tmp_path / "data")
    write_manifest(store, layout, "batch")
    write_embeddings(clip, store, layout, "batch", EncodeOptions(batch_size=4, num_workers=0))
    found = content_check_slice(store, layout, ["batch"], None, budget_s=30)
    assert found.checked_files == 1 and found.changed == {}


def test_a_missing_bucket_or_missing_credentials_is_one_line_naming_the_url_and_what_to_set(s3_store, monkeypatch):
    missing = StoreRoot("s3://no-such-bucket-for-clip-assets/images")
    with pytest.raises(StoreError) as bucket:
        list_batches(missing)
    message = str(bucket.value)
    assert "\n" not in message and "s3://no-such-bucket-for-clip-assets/images" in message
    assert "does not exist" in message and "CLIP_ASSETS_IMAGE_ROOT" in message

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    with pytest.raises(StoreError) as credentials:
        list_batches(StoreRoot(s3_store.url("images")))
    message = str(credentials.value)
    assert "\n" not in message and s3_store.url("images") in message
    assert "no credentials" in message and "AWS_ACCESS_KEY_ID" in message and "instance role" in message


def test_the_image_root_setting_takes_paths_file_urls_and_store_urls(tmp_path):
    assert Settings(image_root=tmp_path).image_root == tmp_path
    assert Settings(image_root=f"file://{tmp_path}").image_root == tmp_path
    assert Settings(image_root="s3://bucket/some/prefix/").image_root == "s3://bucket/some/prefix"
    assert image_root_from(f"file://{tmp_path}") == tmp_path
    with pytest.raises(ValueError, match="name the bucket"):
        Settings(image_root="s3:///prefix")
    with pytest.raises(ValueError, match="no store with the scheme nosuchscheme"):
        Settings(image_root="nosuchscheme://bucket/prefix")


def test_a_scheme_whose_package_is_missing_names_the_package():
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(ValueError, match=r"gs://bucket/images: reading gs:// needs the gcsfs package"):
        image_root_from("gs://bucket/images")


def test_a_store_root_decodes_the_same_image_as_the_file(s3_store, tmp_path):
    """read_file_bytes is the one reader: a thumbnail from the store equals one from the disk."""
    from clip_assets.storage.store_root import read_file_bytes

    data = jpeg_bytes(photo_like(50, 40, seed=3))
    s3_store.filesystem().pipe(f"{s3_store.bucket}/p/b/x.jpg", data)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.jpg").write_bytes(data)
    store = StoreRoot(s3_store.url("p"))
    assert read_file_bytes(store, "b/x.jpg") == read_file_bytes(tmp_path, "b/x.jpg") == data
    assert Image.open(io.BytesIO(read_file_bytes(store, "b/x.jpg"))).size == (50, 40)
