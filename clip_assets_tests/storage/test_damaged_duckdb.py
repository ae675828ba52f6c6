"""A damaged DuckDB file: every reader says which file and how to rebuild it (no DuckDB traceback), and
materializing prompt_centroids moves it aside and starts a new one, which the classifications then fill
again from the parquet files. Run with each kind of damage (clip_assets_tests.support.damage)."""

from __future__ import annotations

import pytest

from clip_assets import checks
from clip_assets.classification.steps import write_centroids, write_classifications
from clip_assets.cli import main
from clip_assets.search.query import images_matching_category
from clip_assets.storage.damaged_files import DamagedFileError, damaged_copies
from clip_assets.storage.warehouse import connect, read_centroids
from clip_assets_tests.conftest import BATCHES
from clip_assets_tests.support.damage import DAMAGES, damage

REBUILD = "dagster asset materialize -m clip_assets.definitions --select prompt_centroids"


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_duckdb_file_is_named_with_its_rebuild_and_rebuilt_by_prompt_centroids(
    how, settings, clip, classified, cli_env, capsys
):
    path = classified.duckdb_path
    with connect(path, read_only=True) as con:
        rows_before = con.execute("SELECT count(*) FROM image_classifications").fetchone()[0]
    assert rows_before > 0
    damage(path, how)
    damaged_bytes = path.read_bytes()

    readers = {
        "centroids": lambda: read_centroids(path),
        "classifications": lambda: checks.one_row_per_image_and_category(classified, "batch-001"),
        "category filter": lambda: images_matching_category(classified, "circle"),
    }
    for name, read in readers.items():
        with pytest.raises(DamagedFileError) as caught:
            read()
        message = str(caught.value)
        assert str(path) in message and REBUILD in message, name
        assert "image_classifications --partition-range" in message, name

    # the embedding step's model check (the embeddings are written all the same): failed, with the message
    outcome = checks.embeddings_match_centroid_model(classified, "batch-001")
    assert not outcome.passed and str(path) in outcome.description and REBUILD in outcome.description

    cli_env(settings)  # the command line: one line naming the file, exit 1, no traceback
    assert main(["search", "a red circle", "--category", "circle"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and REBUILD in err

    # prompt_centroids moves the damaged file aside and starts a new one; the classifications fill it again
    write_centroids(clip, settings.prompts_dir, classified)
    (aside,) = damaged_copies(path)
    assert aside.read_bytes() == damaged_bytes
    assert read_centroids(path).categories
    for batch in BATCHES:
        write_classifications(classified, batch)
    with connect(path, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM image_classifications").fetchone()[0] == rows_before
    assert checks.one_row_per_image_and_category(classified, "batch-001").passed
