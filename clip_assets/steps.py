"""The four pipeline steps as plain functions: read inputs from disk, compute, write outputs.

The Dagster assets call these and turn the returned summaries into materialization metadata; tests
call them directly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_assets.centroids import compute_centroids
from clip_assets.classification import check_same_model, classify_in_chunks
from clip_assets.clip_model import ClipModel
from clip_assets.embedding import embed_manifest, embeddings_matrix
from clip_assets.layout import DataLayout, write_parquet_atomically
from clip_assets.manifest import STATUS_OK, build_manifest
from clip_assets.prompts import Category, load_categories, prompt_version
from clip_assets.warehouse import read_centroids, replace_batch_classifications, replace_centroids, top_images


@dataclass
class ManifestSummary:
    path: Path
    files: int
    usable: int
    unusable: int
    errors: dict[str, str] = field(default_factory=dict)  # relative path -> reason (first few)


def write_manifest(image_root: Path, layout: DataLayout, batch: str) -> ManifestSummary:
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


@dataclass
class EmbeddingSummary:
    path: Path
    encoded: int
    failed: int
    model: str
    dim: int
    failures: dict[str, str] = field(default_factory=dict)


def write_embeddings(
    clip: ClipModel, image_root: Path, layout: DataLayout, batch: str, batch_size: int = 64, num_workers: int = -1
) -> EmbeddingSummary:
    manifest = pq.read_table(layout.manifest_path(batch))
    out = embed_manifest(clip, image_root, manifest, batch_size=batch_size, num_workers=num_workers)
    path = layout.embeddings_path(batch)
    write_parquet_atomically(out.failures, layout.embedding_failures_path(batch))
    write_parquet_atomically(out.embeddings, path)
    return EmbeddingSummary(
        path=path,
        encoded=out.embeddings.num_rows,
        failed=out.failures.num_rows,
        model=clip.identity,
        dim=clip.embed_dim,
        failures=dict(zip(out.failures["path"].to_pylist()[:20], out.failures["error"].to_pylist()[:20])),
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
class ClassificationSummary:
    images: int
    rows: int
    matches: dict[str, int]
    model: str
    prompt_version: str


def write_classifications(layout: DataLayout, batch: str) -> ClassificationSummary:
    embeddings = pq.read_table(layout.embeddings_path(batch))
    centroids = read_centroids(layout.duckdb_path)
    check_same_model(set(embeddings["model"].unique().to_pylist()), centroids.model)
    counts = dict.fromkeys(centroids.categories, 0)

    def counted(chunks):
        for chunk in chunks:
            counts.update(
                {k: counts[k] + v for k, v in Counter(chunk.filter(chunk["matched"])["category"].to_pylist()).items()}
            )
            yield chunk

    rows = replace_batch_classifications(
        layout.duckdb_path,
        batch,
        counted(classify_in_chunks(batch, embeddings["image_id"].to_pylist(), embeddings_matrix(embeddings), centroids)),
    )
    return ClassificationSummary(
        images=embeddings.num_rows,
        rows=rows,
        matches=counts,
        model=centroids.model,
        prompt_version=centroids.prompt_version,
    )


def top_images_table(layout: DataLayout, batch: str, per_category: int = 3) -> list[dict]:
    """The best-scoring images of each category in a batch, with their paths: a preview for people."""
    paths = dict(
        zip(*pq.read_table(layout.manifest_path(batch), columns=["image_id", "path"]).to_pydict().values())
    )
    return [
        {"category": category, "path": paths.get(image_id, image_id), "score": round(value, 4), "matched": matched}
        for category, image_id, value, matched in top_images(layout.duckdb_path, batch, per_category)
    ]
