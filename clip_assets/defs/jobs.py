"""Asset jobs the sensors and schedules launch: one batch end to end, and the centroids from the prompts."""

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from clip_assets.ingest.batch_discovery import contiguous_ranges
from clip_assets.defs.assets import BATCHES_PER_RUN

CLASSIFY_BATCH_JOB = "classify_image_batch"
PROMPT_CENTROIDS_JOB = "prompt_centroids_from_prompt_files"

# A batch's three steps in order: manifest, embeddings, classifications.
classify_image_batch_job = dg.define_asset_job(
    CLASSIFY_BATCH_JOB,
    selection=dg.AssetSelection.assets("image_manifest", "image_embeddings", "image_classifications"),
    description="List, encode and classify one image batch.",
)

# Observes the prompt files and builds the centroids in the same run, so the automation sensor sees
# the observation as already handled and does not build them a second time.
prompt_centroids_job = dg.define_asset_job(
    PROMPT_CENTROIDS_JOB,
    selection=dg.AssetSelection.assets("prompt_files", "prompt_centroids", "category_adapters"),
    description="Observe prompts/ and build the prompt centroids (and the adapters on top of them).",
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
                                     {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last})},
        )
        for first, last in contiguous_ranges(order, batches, BATCHES_PER_RUN)
    ]
