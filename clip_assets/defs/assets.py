"""The four assets. Each body calls one step function and reports what it wrote."""

from pathlib import Path

import dagster as dg

from clip_assets import checks, steps
from clip_assets.batch_discovery import manifest_fingerprint
from clip_assets.plots import png_markdown, score_histograms_png
from clip_assets.warehouse import score_histograms
from clip_assets.defs.k8s import GPU_STEP_K8S_CONFIG
from clip_assets.defs.partitions import image_batches
from clip_assets.defs.resources import ClipModelResource, ImageCollection
from clip_assets.prompts import prompt_files as list_prompt_files
from clip_assets.prompts import prompt_version

OWNER = "team:clip-assets"
# Backfills: batches per run for the manifest and the embeddings (the model loads once per run);
# classifications of any number of batches run as one run.
BATCHES_PER_RUN = 8
# Concurrency pools (limits in dagster.yaml): DuckDB has one writer; the GPU takes one encoder.
DUCKDB_WRITER_POOL = "duckdb_writer"
GPU_POOL = "gpu"
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


def _combined(outcomes: dict[str, checks.CheckOutcome]) -> checks.CheckOutcome:
    """One outcome for the batches of a run: passed when every batch passed."""
    if len(outcomes) == 1:
        return next(iter(outcomes.values()))
    failed = {b: o for b, o in outcomes.items() if not o.passed}
    return checks.CheckOutcome(
        passed=not failed,
        description="; ".join(f"{b}: {o.description}" for b, o in (failed or outcomes).items())[:2000],
        metadata={"batches": len(outcomes), "failed_batches": sorted(failed)},
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
            code_version="1",
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
    backfill_policy=dg.BackfillPolicy.multi_run(BATCHES_PER_RUN),
)
def image_manifest(context: dg.AssetExecutionContext, collection: ImageCollection) -> dg.MaterializeResult:
    """Every file of an image batch: stable image_id, path, size, mtime, format, width, height, status, error."""
    summaries = {b: steps.write_manifest(Path(collection.image_root), collection.layout, b)
                 for b in context.partition_keys}
    # of (path, size, mtime): what the re-scan schedule compares the files on disk with
    fingerprints = {b: manifest_fingerprint(s.path) for b, s in summaries.items()}
    single = len(summaries) == 1
    return dg.MaterializeResult(
        data_version=dg.DataVersion(next(iter(fingerprints.values()))) if single else None,
        metadata={
            "files_fingerprint": next(iter(fingerprints.values())) if single else _markdown_table(
                [{"batch": b, "fingerprint": f} for b, f in fingerprints.items()]),
            "dagster/row_count": sum(s.files for s in summaries.values()),
            "usable_images": sum(s.usable for s in summaries.values()),
            "unusable_files": sum(s.unusable for s in summaries.values()),
            "unusable_examples": _reasons_table(
                dict(kv for s in summaries.values() for kv in s.errors.items())),
            "path": dg.MetadataValue.path(str(next(iter(summaries.values())).path if single
                                              else next(iter(summaries.values())).path.parent)),
        }
    )


@dg.asset(
    partitions_def=image_batches,
    deps=[image_manifest],
    group_name="images",
    kinds={"pytorch", "parquet"},
    owners=[OWNER],
    code_version="1",
    op_tags={"clip_assets/gpu": "true", "dagster-k8s/config": GPU_STEP_K8S_CONFIG},
    pool=GPU_POOL,
    backfill_policy=dg.BackfillPolicy.multi_run(BATCHES_PER_RUN),
    check_specs=[
        dg.AssetCheckSpec("unit_norm_with_model_dimension", asset="image_embeddings",
                          description="Every embedding has the model's dimension, no NaN, and norm 1."),
        dg.AssetCheckSpec("failure_share", asset="image_embeddings",
                          description="Share of the batch's files that could not be embedded; warns above "
                          "CLIP_ASSETS_MAX_FAILURE_SHARE."),
        dg.AssetCheckSpec("same_model_as_centroids", asset="image_embeddings", blocking=True,
                          description="Embeddings and stored centroids share one model identity; "
                          "a mismatch stops the classification of this batch."),
    ],
)
def image_embeddings(
    context: dg.AssetExecutionContext, collection: ImageCollection, clip_model: ClipModelResource
) -> dg.MaterializeResult:
    """L2-normalised OpenCLIP image embeddings of the batch's usable images, with the model's identity."""
    clip = clip_model.load()  # once per run, however many batches a backfill run covers
    layout, batches = collection.layout, context.partition_keys
    summaries = [
        steps.write_embeddings(
            clip,
            Path(collection.image_root),
            layout,
            batch,
            batch_size=clip_model.batch_size,
            num_workers=clip_model.num_workers,
            timeout_s=clip_model.file_timeout_s,
            report=context.log.info,
        )
        for batch in batches
    ]
    unusable = {b: steps.unusable_in_manifest(layout, b) for b in batches}
    return dg.MaterializeResult(
        check_results=[
            _check_result("unit_norm_with_model_dimension", _combined(
                {b: checks.embeddings_are_unit_norm(layout, b, clip.embed_dim) for b in batches})),
            _check_result("failure_share", _combined(
                {b: checks.failure_share_within_limit(s.usable, s.failed, unusable[b], collection.max_failure_share)
                 for b, s in zip(batches, summaries)}), warn=True),
            _check_result("same_model_as_centroids", _combined(
                {b: checks.embeddings_match_centroid_model(layout, b) for b in batches})),
        ],
        metadata={
            "dagster/row_count": sum(s.rows for s in summaries),
            "batches": len(batches),
            "encoded": sum(s.encoded for s in summaries),
            "carried_over": sum(s.carried_over for s in summaries),
            "unchanged_content": sum(s.unchanged_content for s in summaries),
            "resumed": sum(s.resumed for s in summaries),
            "dropped": sum(s.dropped for s in summaries),
            "failed_images": sum(s.failed for s in summaries),
            "unusable_in_manifest": sum(unusable.values()),
            "failure_examples": _reasons_table(dict(kv for s in summaries for kv in s.failures.items())),
            "model": summaries[0].model,
            "dimension": summaries[0].dim,
            "device": str(clip.device),
            "path": dg.MetadataValue.path(str(summaries[0].path if len(summaries) == 1 else summaries[0].path.parent)),
        }
    )


@dg.asset(
    deps=["prompt_files"],
    group_name="prompts",
    kinds={"pytorch", "duckdb"},
    owners=[OWNER],
    code_version="1",
    automation_condition=dg.AutomationCondition.eager(),
    pool=DUCKDB_WRITER_POOL,
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
    pool=DUCKDB_WRITER_POOL,
    backfill_policy=dg.BackfillPolicy.single_run(),
    check_specs=[
        dg.AssetCheckSpec("one_row_per_image_and_category", asset="image_classifications",
                          description="Exactly usable images x categories rows for the batch, none duplicated."),
    ],
)
def image_classifications(context: dg.AssetExecutionContext, collection: ImageCollection) -> dg.MaterializeResult:
    """One row per (image, category) with pos/neg/neutral similarities, score and the matched flag."""
    layout, batches = collection.layout, context.partition_keys
    summaries = [steps.write_classifications(layout, batch) for batch in batches]
    images = sum(s.images for s in summaries)
    matches = {k: sum(s.matches.get(k, 0) for s in summaries) for k in summaries[0].matches}
    per_batch_views = {}
    if len(batches) == 1:  # previews of one batch; a range run reports totals
        plot = score_histograms_png(score_histograms(layout.duckdb_path, batches[0]))
        per_batch_views = {
            "top_images": _markdown_table(steps.top_images_table(layout, batches[0])),
            "score_distribution": dg.MetadataValue.md(png_markdown(plot, "score distribution per category")),
        }
    return dg.MaterializeResult(
        check_results=[
            _check_result("one_row_per_image_and_category", _combined(
                {b: checks.one_row_per_image_and_category(layout, b) for b in batches})),
        ],
        metadata={
            "dagster/row_count": sum(s.rows for s in summaries),
            "batches": len(batches),
            "images": images,
            "matches_per_category": _markdown_table(
                [{"category": k, "images matched": v, "share": f"{v / max(1, images):.1%}"}
                 for k, v in matches.items()]
            ),
            **per_batch_views,
            "model": summaries[0].model,
            "prompt_version": summaries[0].prompt_version,
        }
    )
