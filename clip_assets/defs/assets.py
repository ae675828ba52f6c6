"""The four assets. Each body calls one step function and reports what it wrote."""

from pathlib import Path

import dagster as dg

from clip_assets import steps
from clip_assets.defs.partitions import image_batches
from clip_assets.defs.resources import ClipModelResource, ImageCollection
from clip_assets.prompts import prompt_files as list_prompt_files
from clip_assets.prompts import prompt_version

OWNER = "team:clip-assets"
# How often the automation sensor looks at the prompt files for edits.
PROMPT_OBSERVE_CRON = "* * * * *"


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
    return dg.MaterializeResult(
        metadata={
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
    return dg.MaterializeResult(
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
)
def prompt_centroids(collection: ImageCollection, clip_model: ClipModelResource) -> dg.MaterializeResult:
    """Per category: normalised mean text embedding of its positive, negative and neutral descriptions."""
    summary = steps.write_centroids(clip_model.load(), Path(collection.prompts_dir), collection.layout)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": summary.centroid_rows,
            "categories": summary.categories,
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
)
def image_classifications(context: dg.AssetExecutionContext, collection: ImageCollection) -> dg.MaterializeResult:
    """One row per (image, category) with pos/neg/neutral similarities, score and the matched flag."""
    summary = steps.write_classifications(collection.layout, context.partition_key)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": summary.rows,
            "images": summary.images,
            "matches_per_category": dg.MetadataValue.json(summary.matches),
            "model": summary.model,
            "prompt_version": summary.prompt_version,
        }
    )
