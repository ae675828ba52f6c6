"""The pipeline steps as plain functions: read inputs from disk, compute, write outputs.

The Dagster assets call these and turn the returned summaries into materialization metadata; tests
call them directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_assets.centroids import compute_centroids
from clip_assets.adapter_evaluation import fit_on_tuning_half, load_labelled_embeddings
from clip_assets.adapter_store import adapter_version, adapters_for, content_hash, remove_adapters, write_adapter_file
from clip_assets.adapters import AdapterSet
from clip_assets.calibration import read_labels_file
from clip_assets.classification import (
    CLASSIFICATION_SCHEMA,
    DEFAULT_CHUNK_IMAGES,
    NO_ADAPTER,
    adapters_version,
    check_same_model,
    classify_stream,
    models_in_file,
)
from clip_assets.classification_figures import ClassificationFigures
from clip_assets.clip_model import ClipModel
from clip_assets.fine_tuned_weights import record_fine_tuned_checkpoint
from clip_assets.fine_tuning import FineTuneOptions, FineTuneReport, fine_tune_to_checkpoint
from clip_assets.atomic_files import write_parquet_atomically
from clip_assets.embedding import (
    FAILURES_SCHEMA,
    embeddings_schema,
    encode_images,
)
from clip_assets.embedding_store import (
    BackgroundWrites,
    EmbeddingFileFigures,
    PartFiles,
    plan_encoding,
    write_final,
)
from clip_assets.layout import DataLayout
from clip_assets.manifest import STATUS_OK, build_manifest
from clip_assets.prefetch import prefetched
from clip_assets.prompts import Category, load_categories, prompt_version
from clip_assets.settings import default
from clip_assets.gallery import GalleryImage
from clip_assets.warehouse import read_centroids, replace_batch_classifications, replace_centroids


@dataclass
class ManifestSummary:
    path: Path
    files: int
    usable: int
    unusable: int
    errors: dict[str, str] = field(default_factory=dict)  # relative path -> reason (first few)


def write_manifest(image_root: Path, layout: DataLayout, batch: str) -> ManifestSummary:
    layout.sweep_stale_temp_files()
    table = build_manifest(image_root, batch)
    path = layout.manifest_path(batch)
    write_parquet_atomically(table, path)
    usable = int(pc.sum(pc.equal(table["status"], STATUS_OK)).as_py() or 0)
    bad = table.filter(pc.invert(pc.equal(table["status"], STATUS_OK))).slice(0, 20)
    return ManifestSummary(
        path=path,
        files=table.num_rows,
        usable=usable,
        unusable=table.num_rows - usable,
        errors=dict(zip(bad["path"].to_pylist(), bad["error"].to_pylist())),
    )


def unusable_in_manifest(layout: DataLayout, batch: str) -> int:
    status = pq.read_table(layout.manifest_path(batch), columns=["status"])["status"]
    return int(pc.sum(pc.not_equal(status, STATUS_OK)).as_py() or 0)


@dataclass
class EmbeddingSummary:
    path: Path
    rows: int  # images in the batch file now
    encoded: int  # decoded and run through the model in this run
    carried_over: int  # unchanged since the previous run: not read at all
    unchanged_content: int  # size or mtime changed, content did not: read and hashed, not decoded
    resumed: int  # finished by an interrupted run, taken from its part files
    dropped: int  # no longer in the manifest
    failed: int
    usable: int  # files the manifest found worth opening (stat alone: some may fail to decode)
    model: str
    dim: int
    failures: dict[str, str] = field(default_factory=dict)
    figures: EmbeddingFileFigures = field(default_factory=EmbeddingFileFigures)  # of the file, counted as written

    @property
    def failure_share(self) -> float:
        return self.failed / self.usable if self.usable else 0.0


def write_embeddings(
    clip: ClipModel,
    image_root: Path,
    layout: DataLayout,
    batch: str,
    batch_size: int = default("batch_size"),
    num_workers: int = default("num_workers"),
    chunk_rows: int = default("chunk_rows"),
    timeout_s: float | None = default("file_timeout_s"),
    report: Callable[[str], None] = logging.getLogger(__name__).info,
    decode: str = "pillow",
    flush_interval_s: float = default("flush_interval_s"),
) -> EmbeddingSummary:
    """Encode what is new or changed since the last run of this model; resume an interrupted run."""
    layout.sweep_stale_temp_files(batch)
    manifest = pq.read_table(layout.manifest_path(batch))
    path = layout.embeddings_path(batch)
    parts = PartFiles(layout.embedding_parts_dir(batch), clip.identity)
    parts.discard_other_models()
    plan = plan_encoding(manifest, path, parts)
    report(
        f"{batch}: {len(plan.job.image_ids):,} images to encode, "
        f"{len(plan.carried_ids):,} unchanged, {len(plan.resumed_ids):,} resumed"
    )
    with BackgroundWrites(parts.write) as write_chunk:  # parquet is written while the model goes on
        result = encode_images(
            clip, image_root, plan.job, write_chunk,
            batch_size=batch_size, num_workers=num_workers, chunk_rows=chunk_rows, timeout_s=timeout_s, report=report,
            flush_interval_s=flush_interval_s,
            decode=decode,
        )
    failures = pa.table(
        {k: [f[n] for f in result.failures] for n, k in enumerate(FAILURES_SCHEMA.names)}, schema=FAILURES_SCHEMA
    )
    write_parquet_atomically(failures, layout.embedding_failures_path(batch))
    figures = write_final(path, embeddings_schema(clip.embed_dim), plan, parts)
    parts.remove()
    return EmbeddingSummary(
        path=path,
        rows=figures.rows,
        encoded=result.encoded,
        carried_over=len(plan.carried_ids),
        unchanged_content=result.unchanged_content,
        resumed=len(plan.resumed_ids),
        dropped=plan.dropped,
        failed=len(result.failures),
        usable=len(plan.keep_ids),
        model=clip.identity,
        dim=clip.embed_dim,
        failures={p: e for _, p, e in result.failures[:20]},
        figures=figures,
    )


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
class AdapterSummary:
    version: str  # NO_ADAPTER without labels
    adapters: AdapterSet | None = None
    labelled_images: int = 0  # labelled images with embeddings of the centroids' model
    heldout_images: int = 0  # never used to fit or choose
    without_embeddings: int = 0  # label rows naming no embedded image (not embedded yet, or a wrong path)
    unknown_categories: list[str] = field(default_factory=list)


def write_adapters(layout: DataLayout, labels_path: Path | None, shots: int | None = None) -> AdapterSummary:
    """Fit each prompt file's adapter on the tuning half of the labelled images and store it; without
    labels, remove any stored adapters so classification is zero-shot. Bad labels raise before the
    stored adapters are touched."""
    if labels_path is None:
        remove_adapters(layout.adapters_path)
        return AdapterSummary(NO_ADAPTER)
    labels = read_labels_file(labels_path)
    centroids = read_centroids(layout.duckdb_path)
    data = load_labelled_embeddings(layout, labels, centroids)
    version = adapter_version(content_hash(labels_path), centroids, shots)
    adapters = fit_on_tuning_half(data, centroids, shots, version)
    write_adapter_file(adapters, layout.adapters_path)
    return AdapterSummary(version, adapters, len(data.image_ids), int(data.heldout.sum()),
                          len(data.without_embeddings), data.unknown_categories)


def write_fine_tuned_model(model_name: str, pretrained: str, captions_file: Path, image_root: Path,
                           layout: DataLayout, options: FineTuneOptions, device: str | None = None,
                           log: Callable[[str], None] = print) -> FineTuneReport:
    """Tune the configured model on the captions file, write the checkpoint (named by its content hash)
    and make it the one an opted-in deployment's embeddings and centroids use. A bad captions file
    raises before anything is written."""
    report = fine_tune_to_checkpoint(model_name, pretrained, captions_file, image_root, layout.data_dir, options,
                                     device, log)
    record_fine_tuned_checkpoint(layout, report.checkpoint)
    return report


@dataclass
class ClassificationSummary:
    images: int
    rows: int
    matches: dict[str, int]
    model: str
    prompt_version: str
    adapter_version: str = NO_ADAPTER
    # gathered while the rows streamed to DuckDB (see classification_figures)
    histograms: dict[str, tuple[float, float, list[int], float, str]] = field(default_factory=dict)
    top_images: list[dict] = field(default_factory=list)  # category, path, score, matched
    gallery_rows: dict[str, list[GalleryImage]] = field(default_factory=dict)  # the contact sheet's


def image_paths(layout: DataLayout, batch: str, image_ids: set[str]) -> dict[str, str]:
    """image_id -> path in the batch's manifest, for a few images (only their rows are kept)."""
    manifest = layout.manifest_path(batch)
    if not image_ids or not manifest.exists():
        return {}
    found = pq.read_table(manifest, columns=["image_id", "path"], filters=[("image_id", "in", sorted(image_ids))])
    return dict(zip(found["image_id"].to_pylist(), found["path"].to_pylist()))


def write_classifications(
    layout: DataLayout, batch: str, rows_per_read: int = DEFAULT_CHUNK_IMAGES
) -> ClassificationSummary:
    """Classify the batch's embeddings `rows_per_read` at a time, straight into DuckDB as one insert
    that replaces the batch's rows; the summary's figures are gathered on the way."""
    path = layout.embeddings_path(batch)
    centroids = read_centroids(layout.duckdb_path)
    check_same_model(models_in_file(path), centroids.model)
    adapters = adapters_for(layout.adapters_path, centroids)
    figures = ClassificationFigures(centroids)
    with pq.ParquetFile(path) as embeddings:
        record_batches = embeddings.iter_batches(batch_size=rows_per_read, columns=["image_id", "embedding"])
        rows = replace_batch_classifications(layout.duckdb_path, batch, pa.RecordBatchReader.from_batches(
            # scoring runs a record batch ahead of DuckDB's insert, on another core
            CLASSIFICATION_SCHEMA,
            prefetched(classify_stream(batch, record_batches, centroids, figures.add, adapters=adapters))))
    paths = image_paths(layout, batch, figures.image_ids())
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
