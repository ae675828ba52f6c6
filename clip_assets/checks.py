"""Data checks, as plain functions: each returns whether it passed, a sentence, and numbers.

The Dagster assets report them as asset checks next to the asset they check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq

from clip_assets.classification.centroids import KINDS
from clip_assets.classification.prompts import Category
from clip_assets.classification.rules import models_in_file
from clip_assets.config.layout import DataLayout
from clip_assets.storage.damaged_files import EMBEDDINGS, DamagedFileError
from clip_assets.storage.warehouse import connect
from clip_assets.storage.warehouse import exists as warehouse_exists

if TYPE_CHECKING:  # the embedding store imports the engine, and torch: the code location loads without them
    from clip_assets.embedding.store import EmbeddingFileFigures


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    metadata: dict = field(default_factory=dict)
    headline: str = ""  # a few words for a failed warning's run tag (clip_assets.defs.check_results)


def embeddings_are_unit_norm(layout: DataLayout, batch: str, expected_dim: int) -> CheckOutcome:
    """Every embedding has the model's dimension, no NaN, and norm 1 (the file read a record batch at a time)."""
    from clip_assets.embedding.store import EmbeddingFileFigures

    return unit_norm_outcome(EmbeddingFileFigures.of_file(layout.embeddings_path(batch)), expected_dim)


def unit_norm_outcome(figures: EmbeddingFileFigures, expected_dim: int) -> CheckOutcome:
    """embeddings_are_unit_norm from the figures counted while the file was written."""
    dim, rows = figures.dimension, figures.rows
    passed = dim == expected_dim and figures.nan_rows == 0 and figures.off_norm_rows == 0
    return CheckOutcome(
        passed,
        f"{rows} embeddings of dimension {dim} (model: {expected_dim}); "
        f"{figures.nan_rows} with NaN; {figures.off_norm_rows} not unit-norm",
        {"rows": rows, "dimension": dim, "nan_rows": figures.nan_rows, "off_norm_rows": figures.off_norm_rows},
    )


def embeddings_match_centroid_model(layout: DataLayout, batch: str, models: set[str] | None = None) -> CheckOutcome:
    """The batch's embeddings and the stored centroids come from one model (vacuous before centroids exist).

    `models`: the file's model identities where they were counted as it was written, else it is read.
    """
    if models is None:
        models = models_in_file(layout.embeddings_path(batch))
    if not warehouse_exists(layout.duckdb_path):
        return CheckOutcome(True, "no centroids stored yet", {"embedding_models": sorted(models)})
    try:
        with connect(layout.duckdb_path, read_only=True) as con:
            centroid_models = {r[0] for r in con.execute("SELECT DISTINCT model FROM prompt_centroids").fetchall()}
    except DamagedFileError as exc:  # the embeddings are written all the same: the check says what is wrong
        return CheckOutcome(False, str(exc), {"embedding_models": sorted(models)})
    if not centroid_models:
        return CheckOutcome(True, "no centroids stored yet", {"embedding_models": sorted(models)})
    passed = models <= centroid_models and len(centroid_models) == 1
    return CheckOutcome(
        passed,
        "embeddings and centroids share one model" if passed
        else f"embeddings by {sorted(models)}, centroids by {sorted(centroid_models)}: re-materialize one side",
        {"embedding_models": sorted(models), "centroid_models": sorted(centroid_models)},
    )


def every_category_has_centroids(db_path: Path, categories: list[Category]) -> CheckOutcome:
    """Each category has a centroid for each kind it has descriptions of, with the right count."""
    with connect(db_path, read_only=True) as con:
        stored = {
            (c, k): n for c, k, n in con.execute("SELECT category, kind, prompt_count FROM prompt_centroids").fetchall()
        }
    expected = {(c.name, k): len(getattr(c, k)) for c in categories for k in KINDS if getattr(c, k)}
    missing = sorted(f"{c}/{k}" for (c, k) in expected.keys() - stored.keys())
    extra = sorted(f"{c}/{k}" for (c, k) in stored.keys() - expected.keys())
    wrong = sorted(f"{c}/{k}" for (c, k), n in expected.items() if (c, k) in stored and stored[(c, k)] != n)
    passed = not (missing or extra or wrong)
    return CheckOutcome(
        passed,
        f"{len(expected)} centroids expected for {len(categories)} categories"
        + ("" if passed else f"; missing {missing}, unexpected {extra}, wrong count {wrong}"),
        {"expected": len(expected), "stored": len(stored), "missing": missing, "unexpected": extra},
    )


def one_row_per_image_and_category(layout: DataLayout, batch: str) -> CheckOutcome:
    """The batch has exactly one classification row per (image in its embeddings file, category).

    Compared as a count and a sum of hashes of the (image_id, category) pairs, on both sides: two
    streaming aggregates in DuckDB, where a DISTINCT count over a million images x 50 categories
    would hold all 50 million pairs in memory (6 GB). A duplicate, a gap, or a duplicate hiding a gap
    changes the sum (unless 64-bit hashes collide).
    """
    embeddings = str(layout.embeddings_path(batch))
    with EMBEDDINGS.reading(Path(embeddings), batch):
        images = pq.read_metadata(embeddings).num_rows
    with connect(layout.duckdb_path, read_only=True) as con:
        categories = con.execute("SELECT count(*) FROM prompt_categories").fetchone()[0]
        rows, stored_sum = con.execute(
            "SELECT count(*), coalesce(sum(hash(image_id, category)), 0) FROM image_classifications WHERE batch = ?",
            [batch],
        ).fetchone()
        expected_sum = con.execute(
            "SELECT coalesce(sum(hash(e.image_id, p.category)), 0) "
            "FROM read_parquet(?) e CROSS JOIN (SELECT category FROM prompt_categories) p",
            [embeddings],
        ).fetchone()[0]
    expected = images * categories
    same_pairs = rows == expected and stored_sum == expected_sum
    return CheckOutcome(
        same_pairs,
        f"{rows} rows for {images} images x {categories} categories = {expected}"
        + ("" if same_pairs or rows != expected else "; but not one per (image, category): duplicates and gaps"),
        {"rows": rows, "expected_rows": expected, "same_image_category_pairs": same_pairs},
    )


def failure_share_within_limit(usable: int, failed: int, unusable_in_manifest: int, max_share: float) -> CheckOutcome:
    """Share of a batch's files that could not be embedded: listed as unusable, or failing to decode."""
    files = usable + unusable_in_manifest
    bad = failed + unusable_in_manifest
    share = bad / files if files else 0.0
    return CheckOutcome(
        share <= max_share,
        f"{bad} of {files} files could not be embedded ({share:.1%}; warns above {max_share:.1%})",
        {"failed_files": bad, "files": files, "failure_share": round(share, 4), "max_share": max_share},
        headline=f"{share:.0%} of files unusable",
    )


def recorded_precisions(path: Path) -> set[str]:
    """The precisions an embeddings file records, from its footer's column statistics where they tell
    (one value), else from the column; "unrecorded" for a file written before precisions were."""
    with pq.ParquetFile(path) as f:
        if "precision" not in f.schema_arrow.names:
            return {"unrecorded"}
        column = f.schema_arrow.names.index("precision")
        values: set[str] = set()
        for group in range(f.metadata.num_row_groups):
            stats = f.metadata.row_group(group).column(column).statistics
            if stats is None or not stats.has_min_max or stats.min != stats.max:
                return set(f.read(columns=["precision"])["precision"].unique().to_pylist())
            values.add(stats.min)
        return values


def one_precision_in_collection(layout: DataLayout, batch: str, precisions: set[str]) -> CheckOutcome:
    """The batch's embeddings were computed at the precision every other batch's were: a collection
    that mixes them compares vectors made differently (CLIP_ASSETS_PRECISION changed between runs)."""
    others: dict[str, set[str]] = {}
    for path in layout.embedding_files():
        if path != layout.embeddings_path(batch):
            try:
                others[path.stem] = recorded_precisions(path)
            except (OSError, ValueError):  # unreadable: its own batch's checks say so
                continue
    differing = {b: sorted(p) for b, p in others.items() if p != precisions}
    described = ", ".join(f"{b} ({', '.join(p)})" for b, p in sorted(differing.items())[:5])
    return CheckOutcome(
        len(precisions) <= 1 and not differing,
        f"computed at {', '.join(sorted(precisions)) or 'no rows'}"
        + (f"; other batches differ: {described}{' ...' if len(differing) > 5 else ''}: re-materialize them with "
           f"the same CLIP_ASSETS_PRECISION (rows of another precision are encoded again)" if differing else
           f"; as are the other {len(others)} batches"),
        {"precisions": sorted(precisions), "batches_at_other_precisions": len(differing)},
    )
