"""The four assets. Each body calls one step function and reports what it wrote."""

from pathlib import Path

import dagster as dg

from clip_assets import checks, steps
from clip_assets.batch_discovery import manifest_fingerprint
from clip_assets.plots import png_markdown, score_histograms_png
from clip_assets.warehouse import score_histograms
from clip_assets.defs.partitions import image_batches
from clip_assets.defs.resources import ClipModelResource, ImageCollection
from clip_assets.prompts import prompt_files as list_prompt_files
from clip_assets.prompts import prompt_version

OWNER = "team:clip-assets"
# How often the automation sensor looks at the prompt files for edits.
PROMPT_OBSERVE_CRON = "* * * * *"


def _check_result(name: str, outcome: checks.CheckOutcome, warn: bool = False) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=name,
        passed=outcome.passed,
        severity=dg.AssetCheckSeverity.WARN if warn else dg.AssetCheckSeverity.ERROR,
        description=outcome.description,
        metadata=outcome.metadata,
    )


def _markdown_table(rows: list[dict]) -> dg.MarkdownMetadataValue:
    if not rows:
        return dg.MetadataValue.md("none")
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(r[h]).replace("|", "/") for h in header) + " |" for r in rows]
    return dg.MetadataValue.md("\n".join(lines))


def _reasons_table(reasons: dict[str, str]) -> dg.MarkdownMetadataValue:
    lines = ["| path | reason |", "| --- | --- |"]
    lines += [f"| {path} | {reason.replace('|', '/')[:200]} |" for path, reason in reasons.items()]
    return dg.MetadataValue.md("\n".join(lines) if reasons else "none")


@dg.multi_observable_source_asset(
    specs=[
        dg.AssetSpec(
            "prompt_files",
            description="The human-edited prompt files (prompts/*.toml). Data version: a hash of their content.",
            group_name="prompts",
            kinds={"toml"},
            owners=[OWNER],
            automation_condition=dg.AutomationCondition.cron_tick_passed(PROMPT_OBSERVE_CRON),
        )
    ],
)
def prompt_files(collection: ImageCollection):
    prompts_dir = Path(collection.prompts_dir)
    yield dg.ObserveResult(
        asset_key="prompt_files",
        data_version=dg.DataVersion(prompt_version(prompts_dir)),
        metadata={"files": [p.name for p in list_prompt_files(prompts_dir)], "folder": str(prompts_dir)},
    )


@dg.asset(
    partitions_def=image_batches,
    group_name="images",
    kinds={"parquet"},
    owners=[OWNER],
    code_version="1",
)
def image_manifest(context: dg.AssetExecutionContext, collection: ImageCollection) -> dg.MaterializeResult:
    """Every file of an image batch: stable image_id, path, size, mtime, format, width, height, status, error."""
    summary = steps.write_manifest(Path(collection.image_root), collection.layout, context.partition_key)
    fingerprint = manifest_fingerprint(summary.path)  # of (path, size, mtime): what the re-scan compares
    return dg.MaterializeResult(
        data_version=dg.DataVersion(fingerprint),
        metadata={
            "files_fingerprint": fingerprint,
            "dagster/row_count": summary.files,
            "usable_images": summary.usable,
            "unusable_files": summary.unusable,
            "unusable_examples": _reasons_table(summary.errors),
            "path": dg.MetadataValue.path(str(summary.path)),
        }
    )


@dg.asset(
    partitions_def=image_batches,
    deps=[image_manifest],
    group_name="images",
    kinds={"pytorch", "parquet"},
    owners=[OWNER],
    code_version="1",
    op_tags={"clip_assets/gpu": "true"},
    check_specs=[
        dg.AssetCheckSpec("unit_norm_with_model_dimension", asset="image_embeddings",
                          description="Every embedding has the model's dimension, no NaN, and norm 1."),
        dg.AssetCheckSpec("same_model_as_centroids", asset="image_embeddings", blocking=True,
                          description="Embeddings and stored centroids share one model identity; "
                          "a mismatch stops the classification of this batch."),
    ],
)
def image_embeddings(
    context: dg.AssetExecutionContext, collection: ImageCollection, clip_model: ClipModelResource
) -> dg.MaterializeResult:
    """L2-normalised OpenCLIP image embeddings of the batch's usable images, with the model's identity."""
    clip = clip_model.load()
    summary = steps.write_embeddings(
        clip,
        Path(collection.image_root),
        collection.layout,
        context.partition_key,
        batch_size=clip_model.batch_size,
        num_workers=clip_model.num_workers,
    )
    batch = context.partition_key
    return dg.MaterializeResult(
        check_results=[
            _check_result("unit_norm_with_model_dimension",
                          checks.embeddings_are_unit_norm(collection.layout, batch, clip.embed_dim)),
            _check_result("same_model_as_centroids", checks.embeddings_match_centroid_model(collection.layout, batch)),
        ],
        metadata={
            "dagster/row_count": summary.encoded,
            "failed_images": summary.failed,
            "failure_examples": _reasons_table(summary.failures),
            "model": summary.model,
            "dimension": summary.dim,
            "device": str(clip.device),
            "path": dg.MetadataValue.path(str(summary.path)),
        }
    )


@dg.asset(
    deps=["prompt_files"],
    group_name="prompts",
    kinds={"pytorch", "duckdb"},
    owners=[OWNER],
    code_version="1",
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[
        dg.AssetCheckSpec("every_category_has_centroids", asset="prompt_centroids",
                          description="Each category has a centroid for each kind it has descriptions of."),
    ],
)
def prompt_centroids(collection: ImageCollection, clip_model: ClipModelResource) -> dg.MaterializeResult:
    """Per category: normalised mean text embedding of its positive, negative and neutral descriptions."""
    summary = steps.write_centroids(clip_model.load(), Path(collection.prompts_dir), collection.layout)
    layout = collection.layout
    return dg.MaterializeResult(
        check_results=[
            _check_result("every_category_has_centroids",
                          checks.every_category_has_centroids(layout.duckdb_path, summary.categories)),
        ],
        metadata={
            "dagster/row_count": summary.centroid_rows,
            "categories": _markdown_table(
                [
                    {"category": c.name, "file": c.source, "mode": c.mode, "positive": len(c.positive),
                     "negative": len(c.negative), "neutral": len(c.neutral), "threshold": c.threshold,
                     "neutral_margin": c.neutral_margin}
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
    deps=[image_embeddings, prompt_centroids],
    group_name="classification",
    kinds={"duckdb"},
    owners=[OWNER],
    code_version="1",
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[
        dg.AssetCheckSpec("one_row_per_image_and_category", asset="image_classifications",
                          description="Exactly usable images x categories rows for the batch, none duplicated."),
    ],
)
def image_classifications(context: dg.AssetExecutionContext, collection: ImageCollection) -> dg.MaterializeResult:
    """One row per (image, category) with pos/neg/neutral similarities, score and the matched flag."""
    batch, layout = context.partition_key, collection.layout
    summary = steps.write_classifications(layout, batch)
    plot = score_histograms_png(score_histograms(layout.duckdb_path, batch))
    return dg.MaterializeResult(
        check_results=[
            _check_result("one_row_per_image_and_category", checks.one_row_per_image_and_category(layout, batch)),
        ],
        metadata={
            "dagster/row_count": summary.rows,
            "images": summary.images,
            "matches_per_category": _markdown_table(
                [{"category": k, "images matched": v, "share": f"{v / max(1, summary.images):.1%}"}
                 for k, v in summary.matches.items()]
            ),
            "top_images": _markdown_table(steps.top_images_table(layout, batch)),
            "score_distribution": dg.MetadataValue.md(png_markdown(plot, "score distribution per category")),
            "model": summary.model,
            "prompt_version": summary.prompt_version,
        }
    )
