"""`image_embeddings`: each batch's usable images encoded by the model (clip_assets.embedding)."""

import time

import dagster as dg

from clip_assets.checks import (
    CheckOutcome,
    embeddings_match_centroid_model,
    failure_share_within_limit,
    one_precision_in_collection,
    unit_norm_outcome,
)
from clip_assets.defs.asset_keys import IMAGE_EMBEDDINGS, IMAGE_MANIFEST
from clip_assets.defs.batch_isolation import each_batch
from clip_assets.defs.check_results import check_result, combined, warning_result
from clip_assets.defs.conventions import DUCKDB_READER, GPU_POOL, OWNER
from clip_assets.defs.failures import user_errors_as_failures
from clip_assets.defs.k8s import GPU_STEP_K8S_CONFIG
from clip_assets.defs.metadata import reasons_table
from clip_assets.defs.partitions import BATCHES_PER_RUN, image_batches
from clip_assets.defs.resources import ClipModelResource, ImageCollection
from clip_assets.ingest.steps import unusable_in_manifest


@dg.asset(
    partitions_def=image_batches,
    deps=[IMAGE_MANIFEST],
    group_name="images",
    kinds={"pytorch", "parquet"},
    owners=[OWNER],
    code_version="1",
    op_tags={"clip_assets/gpu": "true", "dagster-k8s/config": GPU_STEP_K8S_CONFIG},
    tags=DUCKDB_READER,  # the same_model_as_centroids check reads the stored centroids' model
    pool=GPU_POOL,
    backfill_policy=dg.BackfillPolicy.multi_run(BATCHES_PER_RUN),
    check_specs=[
        dg.AssetCheckSpec("unit_norm_with_model_dimension", asset=IMAGE_EMBEDDINGS,
                          description="Every embedding has the model's dimension, no NaN, and norm 1."),
        dg.AssetCheckSpec("failure_share", asset=IMAGE_EMBEDDINGS,
                          description="Share of the batch's files that could not be embedded; warns above "
                          "CLIP_ASSETS_MAX_FAILURE_SHARE."),
        dg.AssetCheckSpec("same_model_as_centroids", asset=IMAGE_EMBEDDINGS, blocking=True,
                          description="Embeddings and stored centroids share one model identity; "
                          "a mismatch stops the classification of this batch."),
        dg.AssetCheckSpec("one_precision_in_collection", asset=IMAGE_EMBEDDINGS,
                          description="The batch's embeddings were computed at one precision (CLIP_ASSETS_PRECISION), "
                          "the one every other batch's were; warns on a mix."),
    ],
)
@user_errors_as_failures
def image_embeddings(
    context: dg.AssetExecutionContext, collection: ImageCollection, clip_model: ClipModelResource
) -> dg.MaterializeResult:
    """L2-normalised OpenCLIP image embeddings of the batch's usable images, with the model's identity."""
    # deferred: the step imports torch, which loading the code location does not (see clip_assets.defs)
    from clip_assets.embedding.steps import write_embeddings

    started = time.monotonic()
    clip = clip_model.load(collection.layout, claim_gpu=True)  # once per run, however many batches a backfill run covers
    context.log.info(f"model loaded in {time.monotonic() - started:.1f} s (imports included) on {clip.device}")
    layout, image_root = collection.layout, collection.root

    def encode_batch(batch: str) -> tuple[CheckOutcome, CheckOutcome, CheckOutcome, CheckOutcome]:
        s = write_embeddings(clip, image_root, layout, batch, clip_model.encode_options,
                             report=context.log.info)
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
            "precision": ", ".join(sorted(s.figures.precisions)),
            "path": dg.MetadataValue.path(str(s.path)),
        })
        return (
            unit_norm_outcome(s.figures, clip.embed_dim),  # counted while the file was written
            failure_share_within_limit(s.usable, s.failed, unusable, collection.max_failure_share),
            embeddings_match_centroid_model(layout, batch, s.figures.models),
            one_precision_in_collection(layout, batch, s.figures.precisions),
        )

    outcomes = each_batch(context, encode_batch)
    norms, shares, models, precisions = ({b: o[i] for b, o in outcomes.items()} for i in range(4))
    return dg.MaterializeResult(
        check_results=[
            check_result("unit_norm_with_model_dimension", combined(norms)),
            warning_result(context, "failure_share", shares),
            check_result("same_model_as_centroids", combined(models)),
            warning_result(context, "one_precision_in_collection", precisions),
        ],
        metadata={
            "batches_in_run": len(outcomes),
            "model": clip.identity,
            "dimension": clip.embed_dim,
            "device": str(clip.device),
            "precision": clip.computed_precision,  # of the image tower (CLIP_ASSETS_PRECISION), recorded per row
        },
    )
