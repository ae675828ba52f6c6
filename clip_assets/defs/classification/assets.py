"""`prompt_centroids` from the prompt files, and `image_classifications` of each batch against them
(clip_assets.classification). Each body calls one step function and reports what it wrote."""

from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from clip_assets.checks import CheckOutcome, every_category_has_centroids, one_row_per_image_and_category
from clip_assets.defs.asset_keys import (
    CATEGORY_ADAPTERS,
    IMAGE_CLASSIFICATIONS,
    IMAGE_EMBEDDINGS,
    PROMPT_CENTROIDS,
    PROMPT_FILES,
    REVIEW_LABELS,
)
from clip_assets.defs.batch_isolation import each_batch
from clip_assets.defs.check_results import check_result, combined
from clip_assets.defs.conventions import DUCKDB_WRITER, DUCKDB_WRITER_POOL, OWNER
from clip_assets.defs.failures import user_errors_as_failures
from clip_assets.defs.metadata import picture, table
from clip_assets.defs.partitions import image_batches
from clip_assets.defs.resources import ClipModelResource, ImageCollection

if TYPE_CHECKING:
    from clip_assets.classification.steps import ClassificationSummary


@dg.asset(
    deps=[PROMPT_FILES],
    group_name="prompts",
    kinds={"pytorch", "duckdb"},
    owners=[OWNER],
    code_version="1",
    automation_condition=dg.AutomationCondition.eager(),
    tags=DUCKDB_WRITER,
    pool=DUCKDB_WRITER_POOL,
    check_specs=[
        dg.AssetCheckSpec("every_category_has_centroids", asset=PROMPT_CENTROIDS,
                          description="Each category has a centroid for each kind it has descriptions of."),
    ],
)
@user_errors_as_failures
def prompt_centroids(collection: ImageCollection, clip_model: ClipModelResource) -> dg.MaterializeResult:
    """Per category: normalised mean text embedding of its positive, negative and neutral descriptions."""
    # deferred: the step imports torch, which loading the code location does not (see clip_assets.defs)
    from clip_assets.classification.steps import write_centroids

    summary = write_centroids(clip_model.load(collection.layout), Path(collection.prompts_dir), collection.layout)
    layout = collection.layout
    return dg.MaterializeResult(
        check_results=[
            check_result("every_category_has_centroids",
                          every_category_has_centroids(layout.duckdb_path, summary.categories)),
        ],
        metadata={
            "dagster/row_count": summary.centroid_rows,
            "categories": table(
                [
                    {"category": c.name, "file": c.source, "mode": c.mode, "positive": len(c.positive),
                     "negative": len(c.negative), "neutral": len(c.neutral), "threshold": float(c.threshold),
                     "neutral_margin": float(c.neutral_margin)}
                    for c in summary.categories
                ]
            ),
            "model": summary.model,
            "prompt_version": summary.prompt_version,
            "duckdb": dg.MetadataValue.path(str(collection.layout.duckdb_path)),
        }
    )


@dg.asset(
    partitions_def=image_batches,
    deps=[IMAGE_EMBEDDINGS, PROMPT_CENTROIDS, CATEGORY_ADAPTERS, REVIEW_LABELS],
    group_name="classification",
    kinds={"duckdb"},
    owners=[OWNER],
    code_version="1",
    # New centroids, and new review labels, always bring new adapters (category_adapters depends on
    # them, eager): waiting for those alone classifies each batch once per prompt edit or label. Both at
    # once classified every batch twice.
    automation_condition=dg.AutomationCondition.eager().ignore(dg.AssetSelection.assets(PROMPT_CENTROIDS, REVIEW_LABELS)),
    tags=DUCKDB_WRITER,
    pool=DUCKDB_WRITER_POOL,
    backfill_policy=dg.BackfillPolicy.single_run(),
    check_specs=[
        dg.AssetCheckSpec("one_row_per_image_and_category", asset=IMAGE_CLASSIFICATIONS,
                          description="Exactly usable images x categories rows for the batch, none duplicated."),
    ],
)
@user_errors_as_failures
def image_classifications(context: dg.AssetExecutionContext, collection: ImageCollection) -> dg.MaterializeResult:
    """One row per (image, category) with pos/neg/neutral similarities, score and the matched flag, and
    who decided it (`decided_by`: the rule, the adapter, or a person whose yes or no in the review
    pages wins whatever the threshold).

    Each batch's materialization shows its matches per category, its score distribution, its top
    images and a contact sheet (thumbnails of its best matches and near misses per category; the
    pictures draw the first categories only, and say so). A picture that cannot be drawn is a
    warning (`figure_warnings`), never a failed step: the rows are committed by then.
    """
    # deferred: the step imports torch, which loading the code location does not (see clip_assets.defs)
    from clip_assets.classification.steps import write_classifications

    layout, image_root = collection.layout, collection.root  # a folder, or a StoreRoot: the sheet reads either

    def classify_batch(batch: str) -> tuple[CheckOutcome, "ClassificationSummary"]:
        summary = write_classifications(layout, batch, image_root=image_root)
        for warning in summary.figure_warnings:
            context.log.warning(f"{batch}: {warning}")
        context.add_asset_metadata(partition_key=batch, metadata={
            "dagster/row_count": summary.rows,
            "images": summary.images,
            "matches_per_category": table(
                [{"category": k, "images_matched": v, "share": round(v / max(1, summary.images), 4)}
                 for k, v in summary.matches.items()],
                {"category": "string", "images_matched": "int", "share": "float"},
            ),
            **{name: picture(p.data, p.caption) for name, p in summary.pictures.items()},
            **({"figure_warnings": dg.MetadataValue.md("\n".join(f"- {w}" for w in summary.figure_warnings))}
               if summary.figure_warnings else {}),
            "top_images": table(summary.top_images,
                                {"category": "string", "path": "string", "score": "float", "matched": "bool"}),
        })
        return one_row_per_image_and_category(layout, batch), summary

    done = each_batch(context, classify_batch)
    outcomes = {b: outcome for b, (outcome, _) in done.items()}
    summary = next(iter(done.values()))[1]
    return dg.MaterializeResult(
        check_results=[check_result("one_row_per_image_and_category", combined(outcomes))],
        metadata={
            "batches_in_run": len(done),
            "model": summary.model,
            "prompt_version": summary.prompt_version,
            "adapter_version": summary.adapter_version,
        },
    )
