"""The approximate-nearest-neighbour index shards (one per batch, filled from one codec), the copy threshold
learnt for the model, and the near-duplicate groups, as assets.

The bodies call clip_assets.search.ann_index, clip_assets.search.copy_threshold and
clip_assets.search.near_duplicates and report what they wrote.
"""

from pathlib import Path

import dagster as dg

from clip_assets.defs.asset_keys import COPY_THRESHOLD, IMAGE_EMBEDDINGS
from clip_assets.defs.batch_isolation import each_batch, one_batch_data_version
from clip_assets.defs.conventions import DUCKDB_WRITER, DUCKDB_WRITER_POOL, GPU_POOL, OWNER
from clip_assets.defs.failures import user_errors_as_failures
from clip_assets.defs.k8s import GPU_STEP_K8S_CONFIG
from clip_assets.defs.metadata import table
from clip_assets.defs.partitions import BATCHES_PER_RUN, image_batches
from clip_assets.defs.resources import ClipModelResource, ImageCollection
from clip_assets.pages.gallery import largest_groups, prune_pages, write_duplicates_page
from clip_assets.search import ann_index
from clip_assets.search import near_duplicates as duplicates
from clip_assets.search.copy_threshold import CopyThreshold, collection_model, learnt_or_stored
from clip_assets.storage.warehouse import replace_duplicate_groups

KEEP_DUPLICATES_PAGES = 5  # the newest runs' near-duplicate pages; older ones (5-6 MB each at 1,300 images) go


@dg.asset(
    partitions_def=image_batches,
    deps=[IMAGE_EMBEDDINGS],
    group_name="search",
    kinds={"faiss"},
    owners=[OWNER],
    code_version="1",
    automation_condition=dg.AutomationCondition.eager(),
    backfill_policy=dg.BackfillPolicy.multi_run(BATCHES_PER_RUN),
)
@user_errors_as_failures
def image_search_index(context: dg.AssetExecutionContext, collection: ImageCollection) -> dg.MaterializeResult:
    """The batch's shard of the approximate-nearest-neighbour index: the collection's faiss IVF-PQ
    codec filled with this batch's embeddings (the first shard trains the codec; a collection too
    small for one is searched exactly instead). Only this batch's shard is built: the other
    batches' are untouched."""
    layout = collection.layout

    def index_batch(batch: str) -> str:
        s = ann_index.build_batch_shard(layout, batch)
        context.add_asset_metadata(partition_key=batch, metadata={
            "dagster/row_count": s.rows,
            "kind": s.kind,
            "model": s.model,
            "build_s": round(s.build_s, 2),
            **(shard_metadata(s, layout.ann_shard_path(batch)) if s.kind == ann_index.KIND_IVF else {
                "why_exact": f"no index codec yet: the collection holds fewer than {ann_index.MIN_ROWS_FOR_IVF:,} "
                             "embeddings, and search scores this batch's rows directly",
            }),
        })
        return s.version

    versions = each_batch(context, index_batch)
    return dg.MaterializeResult(
        data_version=one_batch_data_version(versions),
        metadata={"batches_in_run": len(versions)},
    )


def shard_metadata(s: ann_index.ShardSummary, path: Path) -> dict:
    return {
        "factory": s.factory,
        "bytes_per_vector": round(s.bytes_per_vector, 1),
        "index_bytes": s.index_bytes,
        "codec": s.codec,
        "codec_trained_in_this_run": s.codec_trained,
        "codec_trained_for_rows": s.codec_rows,
        "path": dg.MetadataValue.path(str(path)),
    }


def copy_threshold_metadata(learnt: CopyThreshold) -> dict:
    """The learnt threshold, its precision and recall (learnt half and held-out half) and what it came from."""
    def rounded(value: float | None):
        return None if value is None else round(value, 4)

    return {
        "copy_threshold": learnt.threshold,
        "model": learnt.model,
        "target_precision": learnt.target_precision,
        "precision": rounded(learnt.precision),
        "recall": rounded(learnt.recall),
        "heldout_precision": rounded(learnt.heldout_precision),
        "heldout_recall": rounded(learnt.heldout_recall),
        "hash_distance": learnt.hash_distance,
        "recall_by_kind": table([{"kind": k, "recall": round(v, 3)} for k, v in learnt.recall_by_kind.items()],
                                {"kind": "string", "recall": "float"}),
        "sampled_images": learnt.originals,
        "copies_made": learnt.copies,
        "copies_already_in_collection": learnt.copies_in_collection,
        "collection_images": learnt.collection_images,
        "learnt_at": learnt.computed_at,
        **({"why_not_learnt": learnt.why} if learnt.threshold is None else {}),
    }


@dg.asset(
    deps=[IMAGE_EMBEDDINGS],
    group_name="search",
    kinds={"pytorch", "json"},
    owners=[OWNER],
    code_version="1",
    op_tags={"clip_assets/gpu": "true", "dagster-k8s/config": GPU_STEP_K8S_CONFIG},
    pool=GPU_POOL,
    automation_condition=dg.AutomationCondition.eager(),
)
@user_errors_as_failures
def copy_threshold(context: dg.AssetExecutionContext, collection: ImageCollection,
                   clip_model: ClipModelResource) -> dg.MaterializeResult:
    """The cosine similarity at or above which two images (whose perceptual hashes agree) are copies,
    learnt for the collection's model from copies of a sample of the collection's own images at the
    precision CLIP_ASSETS_COPY_PRECISION (clip_assets.search.copy_threshold). Learnt again when the
    model changes; kept otherwise, without loading the model. CLIP_ASSETS_COPY_THRESHOLD overrides it."""
    layout = collection.layout
    batches = sorted(context.instance.get_dynamic_partitions(image_batches.name))
    model = collection_model(layout, batches)
    if model is None:
        raise dg.Failure("No embeddings yet: materialize image_embeddings for a batch first.")
    learnt, why = learnt_or_stored(lambda: clip_model.load(layout), model, collection.root, layout,
                                   batches, collection.copy_precision, collection.copy_hash_distance,
                                   report=context.log.info)
    if learnt.threshold is None:
        context.log.warning(f"copy threshold not learnt: {learnt.why}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"{learnt.model}:{learnt.threshold}:{learnt.computed_at}"),
        metadata={
            **copy_threshold_metadata(learnt),
            "learnt_in_this_run": why is not None,
            "why_learnt": why or "kept: learnt for this model already",
            "set_by_hand": collection.copy_threshold,
            "path": dg.MetadataValue.path(str(layout.copy_threshold_path)),
        },
    )


@dg.asset(
    deps=[image_search_index, COPY_THRESHOLD],
    group_name="search",
    kinds={"faiss", "duckdb", "html"},
    owners=[OWNER],
    code_version="2",
    automation_condition=dg.AutomationCondition.eager(),
    tags=DUCKDB_WRITER,
    pool=DUCKDB_WRITER_POOL,
)
@user_errors_as_failures
def near_duplicates(context: dg.AssetExecutionContext, collection: ImageCollection) -> dg.MaterializeResult:
    """Near-duplicate groups across the whole collection in three tiers, in DuckDB's duplicate_groups,
    and a page of them: exact copies (the same bytes), copies (at or above the copy threshold, learnt
    for the model by copy_threshold or CLIP_ASSETS_COPY_THRESHOLD, with perceptual hashes within
    CLIP_ASSETS_COPY_HASH_DISTANCE bits) and look-alikes (at or above CLIP_ASSETS_DUPLICATE_THRESHOLD).
    Only batches whose index shard changed are queried again. The page is written first and the groups
    committed last, so a failure leaves DuckDB's groups as they were."""
    layout = collection.layout
    batches = sorted(context.instance.get_dynamic_partitions(image_batches.name))
    summary, rows = duplicates.compute_duplicate_groups(
        layout, batches, collection.duplicate_threshold, collection.copy_threshold, collection.copy_hash_distance,
        collection.root)
    for warning in summary.damaged:
        context.log.warning(warning)
    if summary.without_hash:
        context.log.warning(
            f"{summary.without_hash:,} images have no perceptual hash (embedded before hashes were stored: "
            f"{', '.join(summary.without_hash_batches)}): no copy of theirs is confirmed; materialize "
            "image_embeddings for those batches again to add them")
    if summary.colour_unreadable:
        context.log.warning(
            f"{len(summary.colour_unreadable):,} files could not be read to compare colours (gone or changed since "
            f"they were embedded: {', '.join(summary.colour_unreadable[:5])}): no copy of theirs is confirmed")
    learnt = summary.learnt
    page_summary = {
        "copy_threshold": summary.copy_threshold, "copy_threshold_source": summary.copy_threshold_source,
        "heldout_precision": learnt.heldout_precision if learnt and collection.copy_threshold is None else None,
        "heldout_recall": learnt.heldout_recall if learnt and collection.copy_threshold is None else None,
        "hash_distance": summary.hash_distance, "look_alike": summary.threshold,
        "without_hash": summary.without_hash, "without_hash_batches": summary.without_hash_batches,
    }
    page = write_duplicates_page(layout, collection.root, layout.duplicates_page_dir(context.run.run_id),
                                 groups=largest_groups(rows.to_pylist(), 200), summary=page_summary)
    prune_pages(page.parent.parent, KEEP_DUPLICATES_PAGES)  # one page per run: it re-runs after every new batch
    replace_duplicate_groups(layout.duckdb_path, rows)  # last: nothing after it can fail the step
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": summary.images_in_groups,
            "groups": summary.groups,
            **{f"{tier}_groups": summary.groups_by_tier.get(tier, 0) for tier in duplicates.TIERS},
            **{f"{tier}_images": summary.images_by_tier.get(tier, 0) for tier in duplicates.TIERS},
            "pairs": summary.pairs,
            "threshold": summary.threshold,
            "copy_threshold": summary.copy_threshold,
            "copy_threshold_source": summary.copy_threshold_source,
            "copy_precision_heldout": page_summary["heldout_precision"],
            "copy_recall_heldout": page_summary["heldout_recall"],
            "hash_distance": summary.hash_distance,
            "images_without_hash": summary.without_hash,
            "copies_refused_by_colour": summary.refused_by_colour,
            "colour_unreadable": "\n".join(summary.colour_unreadable[:20]) or "none",
            "recomputed_batches": len(summary.recomputed),
            "reused_batches": len(summary.reused),
            "recomputed": ", ".join(summary.recomputed) or "none",
            "waiting_for_index": ", ".join(summary.waiting_for_index) or "none",
            "damaged_files": "\n".join(summary.damaged) or "none",
            "largest_groups": table(summary.largest, {"tier": "string", "first_path": "string", "images": "int"}),
            "seconds": round(summary.seconds, 2),
            "page": dg.MetadataValue.path(str(page)),
        },
    )
