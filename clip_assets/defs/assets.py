"""The four assets. Each body calls one step function and reports what it wrote."""

import time
from pathlib import Path
from typing import Any, Callable

import dagster as dg

from clip_assets import checks

from clip_assets.classification.steps import ClassificationSummary, write_centroids, write_classifications

from clip_assets.embedding.steps import write_embeddings

from clip_assets.ingest.steps import unusable_in_manifest, write_manifest
from clip_assets.ingest.batch_discovery import manifest_fingerprint
from clip_assets.defs.automation import PROMPT_FILES, prompt_files_observation
from clip_assets.defs.batch_isolation import each_batch, one_batch_data_version
from clip_assets.defs.k8s import GPU_STEP_K8S_CONFIG
from clip_assets.defs.metadata import picture, reasons_table, table
from clip_assets.defs.partitions import image_batches
from clip_assets.defs.resources import ClipModelResource, ImageCollection
from clip_assets.pages.gallery import draw_contact_sheet
from clip_assets.ingest.manifest import missing_batch_message
from clip_assets.pages.plots import score_histograms_png

OWNER = "team:clip-assets"
# Backfills: batches per run for the manifest and the embeddings (the model loads once per run);
# classifications of any number of batches run as one run.
BATCHES_PER_RUN = 8
# Concurrency pools (limits in dagster.yaml): DuckDB has one writer; the GPU takes one encoder.
DUCKDB_WRITER_POOL = "duckdb_writer"
GPU_POOL = "gpu"
# What an asset does with the DuckDB file, as a tag the UI shows and filters on
# (`tag:clip_assets/duckdb=read-only`): readers and writers each wait for the other's lock.
DUCKDB_READER = {"clip_assets/duckdb": "read-only"}
DUCKDB_WRITER = {"clip_assets/duckdb": "read-write"}
# A batch's contact sheet: 3 best matches and 2 near misses of each of two failed conditions per category
# (ClassificationFigures' defaults).
CONTACT_SHEET_COLUMNS = 3 + 2 * 2


def _check_result(name: str, outcome: checks.CheckOutcome, warn: bool = False) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=name,
        passed=outcome.passed,
        severity=dg.AssetCheckSeverity.WARN if warn else dg.AssetCheckSeverity.ERROR,
        description=outcome.description,
        metadata=outcome.metadata,
    )


def _combined(outcomes: dict[str, checks.CheckOutcome]) -> checks.CheckOutcome:
    """One outcome for the batches of a run (checks are not per partition in Dagster): passed when
    every batch passed; the description names each batch, failed ones first, one line each; one
    batch's figures are kept as they are, several batches' in a table."""
    if len(outcomes) == 1:
        (batch, outcome), = outcomes.items()
        return checks.CheckOutcome(outcome.passed, f"{batch}: {outcome.description}", {"batch": batch, **outcome.metadata})
    failed = sorted(b for b, o in outcomes.items() if not o.passed)
    lines = [f"{b}: {'FAILED' if b in failed else 'passed'}: {outcomes[b].description}"
             for b in failed + sorted(set(outcomes) - set(failed))]
    head = f"{len(failed)} of {len(outcomes)} batches failed" if failed else f"all {len(outcomes)} batches passed"
    rows = "".join(f"| {b} | {'failed' if b in failed else 'passed'} | {outcomes[b].description} |\n" for b in sorted(outcomes))
    return checks.CheckOutcome(
        passed=not failed,
        description=(head + "\n" + "\n".join(lines))[:2000],
        metadata={"batches": len(outcomes), "failed_batches": ", ".join(failed) or "none",
                  "by_batch": dg.MetadataValue.md("| batch | check | figures |\n| --- | --- | --- |\n" + rows)},
    )


def observed_files_spec(key: dg.AssetKey, description: str, kind: str) -> dg.AssetSpec:
    """A human-edited file (or folder of files) that a sensor observes without a run."""
    return dg.AssetSpec(key, description=description, group_name="prompts", kinds={kind}, owners=[OWNER],
                        code_version="1")


def observed(observation: dg.AssetObservation) -> dg.ObserveResult:
    """An observation made inside a run (the UI's Observe button) as the result the run records."""
    return dg.ObserveResult(asset_key=observation.asset_key, data_version=dg.DataVersion(observation.data_version),
                            metadata=observation.metadata)


def observed_file_source(key: dg.AssetKey, description: str, resource_key: str,
                         observe: Callable[[Any], dg.AssetObservation]) -> dg.AssetsDefinition:
    """A human-edited CSV file as an observable source asset named `key`: observed by its sensor without a
    run, or in a run when asked for (the UI's Observe button); `observe(resource)` makes the observation."""

    @dg.multi_observable_source_asset(specs=[observed_files_spec(key, description, "csv")], name=key.path[-1],
                                      required_resource_keys={resource_key})
    def observe_file(context):
        yield observed(observe(getattr(context.resources, resource_key)))

    return observe_file


@dg.multi_observable_source_asset(
    specs=[observed_files_spec(
        PROMPT_FILES,
        "The human-edited prompt files (prompts/*.toml). Data version: a hash of their content. "
        "Observed by the prompt_files_observation sensor without a run.",
        "toml",
    )],
)
def prompt_files(collection: ImageCollection):
    """Observed in a run only when asked for (the UI's Observe button, the centroids' first build)."""
    yield observed(prompt_files_observation(Path(collection.prompts_dir)))


def _check_batch_folder(image_root: Path, batch: str) -> None:
    """Before anything is written for a batch: its folder exists, else its work fails saying so."""
    if not (image_root / batch).is_dir():
        raise dg.Failure(description=missing_batch_message(image_root, batch))


@dg.asset(
    partitions_def=image_batches,
    group_name="images",
    kinds={"parquet"},
    owners=[OWNER],
    code_version="1",
    backfill_policy=dg.BackfillPolicy.multi_run(BATCHES_PER_RUN),
)
def image_manifest(context: dg.AssetExecutionContext, collection: ImageCollection) -> dg.MaterializeResult:
    """Every file of an image batch, from stat alone: stable image_id, path, size, mtime, status, error.

    A file is not opened here: one that is not a usable image is recorded by image_embeddings.
    """
    image_root = Path(collection.image_root)

    def list_batch(batch: str) -> str:
        _check_batch_folder(image_root, batch)
        summary = write_manifest(image_root, collection.layout, batch)
        # of (path, size, mtime): what the re-scan schedule compares the files on disk with
        fingerprint = manifest_fingerprint(summary.path)
        context.add_asset_metadata(partition_key=batch, metadata={
            "files_fingerprint": fingerprint,
            "dagster/row_count": summary.files,
            "usable_images": summary.usable,
            "unusable_files": summary.unusable,
            "unusable_examples": reasons_table(summary.errors),
            "path": dg.MetadataValue.path(str(summary.path)),
        })
        return fingerprint

    fingerprints = each_batch(context, list_batch)
    return dg.MaterializeResult(
        data_version=one_batch_data_version(fingerprints),
        metadata={"batches_in_run": len(fingerprints)},
    )


@dg.asset(
    partitions_def=image_batches,
    deps=[image_manifest],
    group_name="images",
    kinds={"pytorch", "parquet"},
    owners=[OWNER],
    code_version="1",
    op_tags={"clip_assets/gpu": "true", "dagster-k8s/config": GPU_STEP_K8S_CONFIG},
    tags=DUCKDB_READER,  # the same_model_as_centroids check reads the stored centroids' model
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
    started = time.monotonic()
    clip = clip_model.load(collection.layout, claim_gpu=True)  # once per run, however many batches a backfill run covers
    context.log.info(f"model loaded in {time.monotonic() - started:.1f} s (imports included) on {clip.device}")
    layout = collection.layout

    def encode_batch(batch: str) -> tuple[checks.CheckOutcome, checks.CheckOutcome, checks.CheckOutcome]:
        s = write_embeddings(
            clip,
            Path(collection.image_root),
            layout,
            batch,
            batch_size=clip_model.batch_size,
            num_workers=clip_model.num_workers,
            timeout_s=clip_model.file_timeout_s,
            chunk_rows=clip_model.chunk_rows,
            flush_interval_s=clip_model.flush_interval_s,
            report=context.log.info,
            decode=clip_model.decode,
        )
        unusable = unusable_in_manifest(layout, batch)
        context.add_asset_metadata(partition_key=batch, metadata={
            "dagster/row_count": s.rows,
            "encoded": s.encoded,
            "carried_over": s.carried_over,
            "unchanged_content": s.unchanged_content,
            "resumed": s.resumed,
            "dropped": s.dropped,
            "failed_images": s.failed,
            "unusable_in_manifest": unusable,
            "failure_examples": reasons_table(s.failures),
            "path": dg.MetadataValue.path(str(s.path)),
        })
        return (
            checks.unit_norm_outcome(s.figures, clip.embed_dim),  # counted while the file was written
            checks.failure_share_within_limit(s.usable, s.failed, unusable, collection.max_failure_share),
            checks.embeddings_match_centroid_model(layout, batch, s.figures.models),
        )

    outcomes = each_batch(context, encode_batch)
    norms, shares, models = ({b: o[i] for b, o in outcomes.items()} for i in range(3))
    return dg.MaterializeResult(
        check_results=[
            _check_result("unit_norm_with_model_dimension", _combined(norms)),
            _check_result("failure_share", _combined(shares), warn=True),
            _check_result("same_model_as_centroids", _combined(models)),
        ],
        metadata={
            "batches_in_run": len(outcomes),
            "model": clip.identity,
            "dimension": clip.embed_dim,
            "device": str(clip.device),
            "precision": clip.precision,  # of the image tower (CLIP_ASSETS_PRECISION, resolved)
        },
    )


@dg.asset(
    deps=["prompt_files"],
    group_name="prompts",
    kinds={"pytorch", "duckdb"},
    owners=[OWNER],
    code_version="1",
    automation_condition=dg.AutomationCondition.eager(),
    tags=DUCKDB_WRITER,
    pool=DUCKDB_WRITER_POOL,
    check_specs=[
        dg.AssetCheckSpec("every_category_has_centroids", asset="prompt_centroids",
                          description="Each category has a centroid for each kind it has descriptions of."),
    ],
)
def prompt_centroids(collection: ImageCollection, clip_model: ClipModelResource) -> dg.MaterializeResult:
    """Per category: normalised mean text embedding of its positive, negative and neutral descriptions."""
    summary = write_centroids(clip_model.load(collection.layout), Path(collection.prompts_dir), collection.layout)
    layout = collection.layout
    return dg.MaterializeResult(
        check_results=[
            _check_result("every_category_has_centroids",
                          checks.every_category_has_centroids(layout.duckdb_path, summary.categories)),
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
    deps=[image_embeddings, prompt_centroids, "category_adapters"],
    group_name="classification",
    kinds={"duckdb"},
    owners=[OWNER],
    code_version="1",
    # New centroids always bring new adapters (category_adapters depends on them, eager): waiting for
    # those alone classifies each batch once per prompt edit. Both at once classified every batch twice.
    automation_condition=dg.AutomationCondition.eager().ignore(dg.AssetSelection.assets("prompt_centroids")),
    tags=DUCKDB_WRITER,
    pool=DUCKDB_WRITER_POOL,
    backfill_policy=dg.BackfillPolicy.single_run(),
    check_specs=[
        dg.AssetCheckSpec("one_row_per_image_and_category", asset="image_classifications",
                          description="Exactly usable images x categories rows for the batch, none duplicated."),
    ],
)
def image_classifications(context: dg.AssetExecutionContext, collection: ImageCollection) -> dg.MaterializeResult:
    """One row per (image, category) with pos/neg/neutral similarities, score and the matched flag.

    Each batch's materialization shows its matches per category, its score distribution, its top
    images and a contact sheet (thumbnails of its best matches and near misses per category).
    """
    layout, image_root = collection.layout, Path(collection.image_root)

    def classify_batch(batch: str) -> tuple[checks.CheckOutcome, ClassificationSummary]:
        summary = write_classifications(layout, batch)
        context.add_asset_metadata(partition_key=batch, metadata={
            "dagster/row_count": summary.rows,
            "images": summary.images,
            "matches_per_category": table(
                [{"category": k, "images_matched": v, "share": round(v / max(1, summary.images), 4)}
                 for k, v in summary.matches.items()],
                {"category": "string", "images_matched": "int", "share": "float"},
            ),
            "score_distribution": picture(
                score_histograms_png(summary.histograms), f"{batch}: score distribution per category"),
            "contact_sheet": picture(
                draw_contact_sheet(image_root, summary.gallery_rows, CONTACT_SHEET_COLUMNS),
                f"{batch}: best matches and near misses per category"),
            "top_images": table(summary.top_images,
                                {"category": "string", "path": "string", "score": "float", "matched": "bool"}),
        })
        return checks.one_row_per_image_and_category(layout, batch), summary

    done = each_batch(context, classify_batch)
    outcomes = {b: outcome for b, (outcome, _) in done.items()}
    summary = next(iter(done.values()))[1]
    return dg.MaterializeResult(
        check_results=[_check_result("one_row_per_image_and_category", _combined(outcomes))],
        metadata={
            "batches_in_run": len(done),
            "model": summary.model,
            "prompt_version": summary.prompt_version,
            "adapter_version": summary.adapter_version,
        },
    )
