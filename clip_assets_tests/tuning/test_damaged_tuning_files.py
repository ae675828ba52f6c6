"""Damaged files of the labels side: the adapters file (named with its rebuild, and rebuilt by
category_adapters), a labels file (refused naming it), and the collection-wide readers of calibration
and the adapters, which leave a damaged batch out and use the others. Each kind of damage is tried
(clip_assets_tests.support.damage)."""

from __future__ import annotations

import csv

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_assets.classification.steps import write_classifications
from clip_assets.storage.damaged_files import DamagedFileError
from clip_assets.storage.warehouse import read_centroids
from clip_assets.tuning.adapter_evaluation import load_labelled_embeddings
from clip_assets.tuning.calibration import load_labelled_scores
from clip_assets.tuning.labels_file import LabelsFileError, read_labels_file
from clip_assets.tuning.steps import write_adapters
from clip_assets_tests.support.damage import DAMAGES, damage


def labels_csv(collection, path):
    """The generated collection's labels (path, labels) as a labels file."""
    lines = (collection / "labels.csv").read_text().splitlines()
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_adapters_file_is_named_with_its_rebuild_and_rebuilt_by_category_adapters(
    how, classified, collection, tmp_path
):
    labels = labels_csv(collection, tmp_path / "labels.csv")
    version = write_adapters(classified, labels).version
    path = classified.adapters_path
    damage(path, how)
    with pytest.raises(DamagedFileError) as caught:
        write_classifications(classified, "batch-001")
    assert str(path) in str(caught.value)
    assert "dagster asset materialize -m clip_assets.definitions --select category_adapters" in str(caught.value)

    assert write_adapters(classified, labels).version == version  # written anew over it
    assert write_classifications(classified, "batch-001").adapter_version == version


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_labels_file_is_refused_naming_it(how, classified, collection, tmp_path):
    csv_labels = labels_csv(collection, tmp_path / "labels.csv")
    parquet_labels = tmp_path / "labels.parquet"
    pq.write_table(pa.table({k: [r[k] for r in read_rows(csv_labels)] for k in ("path", "labels")}), parquet_labels)
    assert read_labels_file(parquet_labels).labels == read_labels_file(csv_labels).labels
    damage(parquet_labels, how)
    with pytest.raises(LabelsFileError, match=str(parquet_labels)):
        read_labels_file(parquet_labels)
    if how != "truncated":  # a CSV cut short is still a CSV: its rows before the cut are read
        damage(csv_labels, how)
        with pytest.raises(LabelsFileError, match=str(csv_labels)):
            read_labels_file(csv_labels)


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("how", DAMAGES)
def test_calibration_and_the_adapters_leave_a_damaged_batch_out_and_use_the_others(
    how, classified, collection, tmp_path, caplog
):
    labels = read_labels_file(labels_csv(collection, tmp_path / "labels.csv"))
    centroids = read_centroids(classified.duckdb_path)
    whole = load_labelled_embeddings(classified, labels, centroids)
    assert len(whole.image_ids) == 20
    damage(classified.embeddings_path("batch-002"), how)
    damage(classified.manifest_path("batch-001"), how)

    caplog.clear()
    # the adapters' sample: batch-002's embeddings and batch-001's manifest are unreadable, so no image
    # is both named and embedded; each damaged file is named in a warning
    sample = load_labelled_embeddings(classified, labels, centroids)
    assert sample.image_ids == [] and len(sample.without_embeddings) == 20
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert (
        str(classified.embeddings_path("batch-002")) in warned and str(classified.manifest_path("batch-001")) in warned
    )

    scores = load_labelled_scores(classified, labels)  # calibration: batch-002's images, named by its manifest
    assert len(scores.image_ids) == 10 and all(p.startswith("batch-002/") for p in scores.paths)
