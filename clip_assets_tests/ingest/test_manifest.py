import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clip_assets.ingest.manifest import (
    STATUS_ERROR,
    STATUS_OK,
    STATUS_SKIPPED,
    build_manifest,
    image_id_for,
    list_batches,
)


@pytest.fixture
def root(tmp_path):
    batch = tmp_path / "root" / "b1"
    (batch / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(batch / "a.jpg")
    Image.new("RGBA", (20, 50)).save(batch / "sub" / "b.png")
    (batch / "empty.jpg").write_bytes(b"")
    (batch / "text.png").write_text("<html>not an image</html>")
    (batch / ".DS_Store").write_bytes(b"junk")
    outside = tmp_path / "outside.jpg"
    Image.new("RGB", (8, 8)).save(outside)
    os.symlink(outside, batch / "link.jpg")
    (tmp_path / "root" / ".hidden_batch").mkdir()
    (tmp_path / "root" / "b2").mkdir()
    return tmp_path / "root"


def rows_by_path(table: pa.Table) -> dict:
    return {r["path"]: r for r in table.to_pylist()}


def test_lists_batch_folders_only(root):
    assert list_batches(root) == ["b1", "b2"]


def test_missing_root_says_which_variable(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIP_ASSETS_IMAGE_ROOT"):
        list_batches(tmp_path / "nope")


def test_every_file_listed_with_status_and_reason(root):
    rows = rows_by_path(build_manifest(root, "b1"))
    assert set(rows) == {"b1/a.jpg", "b1/sub/b.png", "b1/empty.jpg", "b1/text.png", "b1/link.jpg"}
    a = rows["b1/a.jpg"]
    assert (a["status"], a["error"]) == (STATUS_OK, None)
    stat = (root / "b1" / "a.jpg").stat()
    assert (a["size"], a["mtime"]) == (stat.st_size, stat.st_mtime)
    assert rows["b1/sub/b.png"]["status"] == STATUS_OK
    assert rows["b1/empty.jpg"]["status"] == STATUS_ERROR and rows["b1/empty.jpg"]["error"] == "empty file"
    assert rows["b1/link.jpg"]["status"] == STATUS_SKIPPED and "outside" in rows["b1/link.jpg"]["error"]
    # stat alone: a file that is not an image is left to the embedding step, which records why
    assert (rows["b1/text.png"]["status"], rows["b1/text.png"]["error"]) == (STATUS_OK, None)


def test_the_manifest_holds_what_stat_knows_and_nothing_read_from_the_files(root):
    assert build_manifest(root, "b1").schema.names == ["image_id", "path", "size", "mtime", "status", "error"]


def test_image_ids_are_stable_and_map_back_to_paths(root):
    first = build_manifest(root, "b1")
    (root / "b1" / "new.jpg").write_bytes((root / "b1" / "a.jpg").read_bytes())
    second = rows_by_path(build_manifest(root, "b1"))
    for row in first.to_pylist():
        assert second[row["path"]]["image_id"] == row["image_id"] == image_id_for(row["path"])
    assert len({r["image_id"] for r in second.values()}) == len(second)


def test_names_that_are_not_utf8_are_recorded_and_the_rest_listed(root):
    """Linux allows any bytes in a name; parquet strings are UTF-8. Such files are skipped with the reason."""
    batch = os.fsencode(root / "b1")
    Image.new("RGB", (8, 8)).save(os.path.join(batch, b"caf\xe9.jpg"), "JPEG")
    os.mkdir(os.path.join(batch, b"d\xff"))
    Image.new("RGB", (8, 8)).save(os.path.join(batch, b"d\xff", b"inside.jpg"), "JPEG")
    table = build_manifest(root, "b1")
    pq.write_table(table, root.parent / "manifest.parquet")  # the whole table is valid UTF-8
    rows = rows_by_path(pq.read_table(root.parent / "manifest.parquet"))
    assert rows["b1/a.jpg"]["status"] == STATUS_OK and rows["b1/sub/b.png"]["status"] == STATUS_OK
    odd = {p: r for p, r in rows.items() if "\\x" in p}
    assert set(odd) == {"b1/caf\\xe9.jpg", "b1/d\\xff/inside.jpg"}
    for path, row in odd.items():
        assert row["status"] == STATUS_SKIPPED and "not valid UTF-8" in row["error"], row
        assert f"b'{path}'" in row["error"]  # the bytes on disk, shown escaped
    # ids hash the bytes on disk: one per file, and unlike the id of a file literally named 'caf\xe9.jpg'
    assert len({r["image_id"] for r in rows.values()}) == len(rows)
    assert odd["b1/caf\\xe9.jpg"]["image_id"] != image_id_for("b1/caf\\xe9.jpg")


def test_symlinked_folders_are_recorded_not_followed(root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(elsewhere / "x.jpg")
    os.symlink(elsewhere, root / "b1" / "linked-out")
    os.symlink(root / "b1" / "sub", root / "b1" / "linked-in")  # inside the root: still not followed
    rows = rows_by_path(build_manifest(root, "b1"))
    for name in ("b1/linked-out", "b1/linked-in"):
        assert rows[name]["status"] == STATUS_SKIPPED and rows[name]["error"] == "symlinked folder: not followed"
    assert not any(p.startswith(("b1/linked-out/", "b1/linked-in/")) for p in rows)
    assert rows["b1/sub/b.png"]["status"] == STATUS_OK


def test_a_symlink_loop_is_recorded_and_the_batch_listed(root):
    batch = root / "b1"
    os.symlink(batch / "loop-b", batch / "loop-a")
    os.symlink(batch / "loop-a", batch / "loop-b")
    os.symlink(batch / "self", batch / "self")
    rows = rows_by_path(build_manifest(root, "b1"))
    for name in ("b1/loop-a", "b1/loop-b", "b1/self"):
        assert rows[name]["status"] == STATUS_ERROR and rows[name]["error"].startswith("symlink loop"), rows[name]
    assert rows["b1/a.jpg"]["status"] == STATUS_OK and rows["b1/sub/b.png"]["status"] == STATUS_OK
