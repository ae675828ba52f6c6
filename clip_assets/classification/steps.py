"""The centroid and classification steps as plain functions: prompts to centroids, embeddings to DuckDB rows.

The Dagster assets call these and turn the returned summaries into materialization metadata; tests
call them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from clip_assets.classification.centroids import compute_centroids
from clip_assets.classification.figures import ClassificationFigures
from clip_assets.classification.near_misses import GalleryImage
from clip_assets.classification.prompts import Category, load_categories, prompt_version
from clip_assets.classification.rules import (
    CLASSIFICATION_SCHEMA,
    DEFAULT_CHUNK_IMAGES,
    NO_ADAPTER,
    adapters_version,
    check_same_model,
    classify_stream,
    models_in_file,
)
from clip_assets.config.layout import DataLayout
from clip_assets.embedding.prefetch import prefetched
from clip_assets.ingest.manifest import image_paths
from clip_assets.model.clip_model import ClipModel
from clip_assets.storage.warehouse import read_centroids, replace_batch_classifications, replace_centroids
from clip_assets.tuning.adapter_store import adapters_for
from clip_assets.tuning.label_sources import batch_verdicts


@dataclass
class CentroidSummary:
    categories: list[Category]
    centroid_rows: int
    model: str
    prompt_version: str


def write_centroids(clip: ClipModel, prompts_dir: Path, layout: DataLayout) -> CentroidSummary:
    """Validate every prompt file first: a broken one raises before the stored centroids are touched."""
    version = prompt_version(prompts_dir)
    categories = load_categories(prompts_dir)
    centroids = compute_centroids(categories, clip, version)
    rows = replace_centroids(layout.duckdb_path, centroids)
    return CentroidSummary(
        categories=categories, centroid_rows=rows, model=centroids.model, prompt_version=version
    )


@dataclass
class ClassificationSummary:
    images: int
    rows: int
    matches: dict[str, int]
    model: str
    prompt_version: str
    adapter_version: str = NO_ADAPTER
    # gathered while the rows streamed to DuckDB (see clip_assets.classification.figures)
    histograms: dict[str, tuple[float, float, list[int], float, str]] = field(default_factory=dict)
    top_images: list[dict] = field(default_factory=list)  # category, path, score, matched
    gallery_rows: dict[str, list[GalleryImage]] = field(default_factory=dict)  # the contact sheet's


def write_classifications(
    layout: DataLayout, batch: str, rows_per_read: int = DEFAULT_CHUNK_IMAGES
) -> ClassificationSummary:
    """Classify the batch's embeddings `rows_per_read` at a time, straight into DuckDB as one insert
    that replaces the batch's rows; the summary's figures are gathered on the way."""
    path = layout.embeddings_path(batch)
    centroids = read_centroids(layout.duckdb_path)
    check_same_model(models_in_file(path), centroids.model)
    adapters = adapters_for(layout.adapters_path, centroids)
    verdicts = batch_verdicts(layout.review_labels_path, layout, batch, centroids.categories)
    figures = ClassificationFigures(centroids)
    with pq.ParquetFile(path) as embeddings:
        record_batches = embeddings.iter_batches(batch_size=rows_per_read, columns=["image_id", "embedding"])
        rows = replace_batch_classifications(layout.duckdb_path, batch, pa.RecordBatchReader.from_batches(
            # scoring runs a record batch ahead of DuckDB's insert, on another core
            CLASSIFICATION_SCHEMA,
            prefetched(classify_stream(batch, record_batches, centroids, figures.add, adapters=adapters,
                                            verdicts=verdicts))))
    paths = image_paths(layout, {batch: figures.image_ids()})
    return ClassificationSummary(
        images=figures.images,
        rows=rows,
        matches=figures.matches_per_category(),
        model=centroids.model,
        prompt_version=centroids.prompt_version,
        adapter_version=adapters_version(adapters),
        histograms=figures.histograms(),
        top_images=[
            {"category": category, "path": paths.get(image_id, image_id), "score": round(value, 4), "matched": matched}
            for category, image_id, value, matched in figures.top_images()
        ],
        gallery_rows=figures.gallery_rows(paths, batch),
    )

