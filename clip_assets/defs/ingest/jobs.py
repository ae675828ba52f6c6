"""The job the discovery sensor, the re-scan schedule and the split sensor launch: one batch end to end."""

import dagster as dg

from clip_assets.defs.asset_keys import BATCH_ASSETS
from clip_assets.defs.partitions import BATCHES_PER_RUN
from clip_assets.ingest.batch_discovery import contiguous_ranges
from clip_assets.instance.dagster_internals import partition_range_tags

CLASSIFY_BATCH_JOB = "classify_image_batch"

# A batch's three steps in order: manifest, embeddings, classifications.
classify_image_batch_job = dg.define_asset_job(
    CLASSIFY_BATCH_JOB,
    selection=dg.AssetSelection.assets(*BATCH_ASSETS),
    description="List, encode and classify one image batch.",
)


def batch_run_requests(
    order: list[str], batches: list[str], run_key_prefix: str, tags: dict[str, str] | None = None
) -> list[dg.RunRequest]:
    """Runs of `classify_image_batch` over up to BATCHES_PER_RUN consecutive batches each, as a backfill
    groups them: one model load per run. `order` is the partitions' order in the instance. Each run's
    key is `<prefix>:<first>..<last>` (a sensor requests a key once; a schedule once per tick). A run of
    one batch is a run of that partition, so the Runs list shows which batch it is."""
    return [
        dg.RunRequest(
            run_key=f"{run_key_prefix}:{first}..{last}",
            job_name=CLASSIFY_BATCH_JOB,
            partition_key=first if first == last else None,
            tags={**(tags or {}), **({} if first == last else
                                     partition_range_tags(first, last))},
        )
        for first, last in contiguous_ranges(order, batches, BATCHES_PER_RUN)
    ]
