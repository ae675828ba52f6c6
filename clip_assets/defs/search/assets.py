"""The approximate-nearest-neighbour index shards (one per batch, filled from one codec) and the near-duplicate groups, as assets.

The bodies call clip_assets.search.ann_index and clip_assets.search.near_duplicates and report what they wrote.
"""

from pathlib import Path

import dagster as dg

from clip_assets.defs.asset_keys import IMAGE_EMBEDDINGS
from clip_assets.defs.batch_isolation import each_batch, one_batch_data_version
from clip_assets.defs.conventions import DUCKDB_WRITER, DUCKDB_WRITER_POOL, OWNER
from clip_assets.defs.failures import user_errors_as_failures
from clip_assets.defs.metadata import table
from clip_assets.defs.partitions import BATCHES_PER_RUN, image_batches
from clip_assets.defs.resources import ImageCollection
from clip_assets.pages.gallery import prune_pages, write_duplicates_page
from clip_assets.search import ann_index
from clip_assets.search import near_duplicates as duplicates

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


@dg.asset(
    deps=[image_search_index],
    group_name="search",
    kinds={"faiss", "duckdb", "html"},
    owners=[OWNER],
    code_version="1",
    automation_condition=dg.AutomationCondition.eager(),
    tags=DUCKDB_WRITER,
    pool=DUCKDB_WRITER_POOL,
)
@user_errors_as_failures
def near_duplicates(context: dg.AssetExecutionContext, collection: ImageCollection) -> dg.MaterializeResult:
    """Groups of near-duplicate images across the whole collection (cosine similarity at or above
    CLIP_ASSETS_DUPLICATE_THRESHOLD) in DuckDB's duplicate_groups, and a gallery page of them. Only
    batches whose index shard changed are queried again."""
    layout = collection.layout
    batches = sorted(context.instance.get_dynamic_partitions(image_batches.name))
    summary = duplicates.update_duplicate_groups(layout, batches, collection.duplicate_threshold)
    for warning in summary.damaged:
        context.log.warning(warning)
    page = write_duplicates_page(layout, Path(collection.image_root), layout.duplicates_page_dir(context.run.run_id))
    prune_pages(page.parent.parent, KEEP_DUPLICATES_PAGES)  # one page per run: it re-runs after every new batch
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": summary.images_in_groups,
            "groups": summary.groups,
            "pairs": summary.pairs,
            "threshold": summary.threshold,
            "recomputed_batches": len(summary.recomputed),
            "reused_batches": len(summary.reused),
            "recomputed": ", ".join(summary.recomputed) or "none",
            "waiting_for_index": ", ".join(summary.waiting_for_index) or "none",
            "damaged_files": "\n".join(summary.damaged) or "none",
            "largest_groups": table(summary.largest, {"first_path": "string", "images": "int"}),
            "seconds": round(summary.seconds, 2),
            "page": dg.MetadataValue.path(str(page)),
        },
    )
