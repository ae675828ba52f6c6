"""The centroid and classification steps as plain functions: prompts to centroids, embeddings to DuckDB rows.

The Dagster assets call these and turn the returned summaries into materialization metadata; tests
call them directly.

A classification commits its rows last: everything that can fail the step (the centroids, the model
check, the adapters, reading the embeddings) comes before or during the one transaction. What is
made after it, the figures and pictures, cannot fail the step: a figure that cannot be made is a
warning in the summary (`figure_warnings`, shown with the materialization), so DuckDB and the step's
outcome always agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

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
from clip_assets.pages.gallery import draw_contact_sheet
from clip_assets.pages.plots import MAX_CATEGORIES_DRAWN, categories_left_out_note, score_histograms_png
from clip_assets.storage.warehouse import read_centroids, replace_batch_classifications, replace_centroids
from clip_assets.tuning.adapter_store import adapters_for
from clip_assets.tuning.label_sources import batch_verdicts

log = logging.getLogger(__name__)
T = TypeVar("T")

# A batch's pictures, by their metadata names. The contact sheet's columns: 3 best matches and 2 near
# misses of each of two failed conditions per category (ClassificationFigures' defaults).
SCORE_DISTRIBUTION = "score_distribution"
CONTACT_SHEET = "contact_sheet"
CONTACT_SHEET_COLUMNS = 3 + 2 * 2


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


@dataclass(frozen=True)
class Picture:
    data: bytes  # PNG or JPEG
    caption: str


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
    pictures: dict[str, Picture] = field(default_factory=dict)  # SCORE_DISTRIBUTION, CONTACT_SHEET, when drawn
    figure_warnings: list[str] = field(default_factory=list)  # figures that could not be made; the rows are stored


def _after_commit(summary: ClassificationSummary, what: str, make: Callable[[], T], otherwise: T) -> T:
    """`make()`, or `otherwise` with a warning in the summary: the rows are committed, so nothing may fail now."""
    try:
        return make()
    except Exception as exc:
        warning = (
            f"{what} not made ({type(exc).__name__}: {exc}); the batch's {summary.rows} classification "
            "rows are stored and the step succeeded"
        )
        log.warning(warning)
        summary.figure_warnings.append(warning)
        return otherwise


def write_classifications(
    layout: DataLayout,
    batch: str,
    rows_per_read: int = DEFAULT_CHUNK_IMAGES,
    image_root: Path | None = None,
    max_categories_drawn: int | None = MAX_CATEGORIES_DRAWN,
) -> ClassificationSummary:
    """Classify the batch's embeddings `rows_per_read` at a time, straight into DuckDB as one insert
    that replaces the batch's rows; the summary's figures are gathered on the way. With `image_root`,
    the summary's pictures are drawn too, each at most `max_categories_drawn` categories (None: all).
    Nothing after the insert's commit raises (see the module's docstring)."""
    path = layout.embeddings_path(batch)
    centroids = read_centroids(layout.duckdb_path)
    check_same_model(models_in_file(path), centroids.model)
    adapters = adapters_for(layout.adapters_path, centroids)
    verdicts = batch_verdicts(layout.review_labels_path, batch, centroids.categories)
    figures = ClassificationFigures(centroids)
    with pq.ParquetFile(path) as embeddings:
        record_batches = embeddings.iter_batches(batch_size=rows_per_read, columns=["image_id", "embedding"])
        rows = replace_batch_classifications(layout.duckdb_path, batch, pa.RecordBatchReader.from_batches(
            # scoring runs a record batch ahead of DuckDB's insert, on another core
            CLASSIFICATION_SCHEMA,
            prefetched(classify_stream(batch, record_batches, centroids, figures.add, adapters=adapters,
                                            verdicts=verdicts))))
    summary = ClassificationSummary(
        images=figures.images,
        rows=rows,
        matches=figures.matches_per_category(),
        model=centroids.model,
        prompt_version=centroids.prompt_version,
        adapter_version=adapters_version(adapters),
        histograms=figures.histograms(),
    )
    paths = _after_commit(
        summary,
        f"the top images' paths (from {layout.manifest_path(batch)})",
        lambda: image_paths(layout, {batch: figures.image_ids()}),
        {},
    )
    summary.top_images = [
        {"category": category, "path": paths.get(image_id, image_id), "score": round(value, 4), "matched": matched}
        for category, image_id, value, matched in figures.top_images()
    ]
    summary.gallery_rows = figures.gallery_rows(paths, batch)
    if image_root is not None:
        categories = len(centroids.categories)
        note = categories_left_out_note(min(categories, max_categories_drawn or categories), categories)
        for name, what, draw in (
            (
                SCORE_DISTRIBUTION,
                "score distribution per category",
                lambda: score_histograms_png(summary.histograms, max_categories_drawn),
            ),
            (
                CONTACT_SHEET,
                "best matches and near misses per category",
                lambda: draw_contact_sheet(
                    image_root, summary.gallery_rows, CONTACT_SHEET_COLUMNS, max_categories_drawn
                ),
            ),
        ):
            data = _after_commit(summary, f"the {name.replace('_', ' ')} picture", draw, None)
            if data is not None:
                summary.pictures[name] = Picture(data, f"{batch}: {what}" + (f", {note}" if note else ""))
    return summary
