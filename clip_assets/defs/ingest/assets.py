"""`image_manifest`: every file of a batch, listed from `stat` alone (clip_assets.ingest)."""

from pathlib import Path

import dagster as dg

from clip_assets.defs.batch_isolation import each_batch, one_batch_data_version
from clip_assets.defs.conventions import OWNER
from clip_assets.defs.failures import user_errors_as_failures
from clip_assets.defs.metadata import reasons_table
from clip_assets.defs.partitions import BATCHES_PER_RUN, image_batches
from clip_assets.defs.resources import ImageCollection
from clip_assets.ingest.batch_discovery import manifest_fingerprint
from clip_assets.ingest.manifest import batch_exists, missing_batch_message
from clip_assets.ingest.steps import write_manifest
from clip_assets.storage.store_root import StoreRoot


def check_batch_folder(image_root: Path | StoreRoot, batch: str) -> None:
    """Before anything is written for a batch: its folder exists, else its work fails saying so."""
    if not batch_exists(image_root, batch):
        raise dg.Failure(description=missing_batch_message(image_root, batch))


@dg.asset(
    partitions_def=image_batches,
    group_name="images",
    kinds={"parquet"},
    owners=[OWNER],
    code_version="1",
    backfill_policy=dg.BackfillPolicy.multi_run(BATCHES_PER_RUN),
)
@user_errors_as_failures
def image_manifest(context: dg.AssetExecutionContext, collection: ImageCollection) -> dg.MaterializeResult:
    """Every file of an image batch, from stat alone: stable image_id, path, size, mtime, status, error.

    A file is not opened here: one that is not a usable image is recorded by image_embeddings.
    """
    image_root = collection.root

    def list_batch(batch: str) -> str:
        check_batch_folder(image_root, batch)
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
