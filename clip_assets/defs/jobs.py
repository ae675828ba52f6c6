"""Asset jobs the sensors and schedules launch: one batch end to end, and the centroids from the prompts."""

import dagster as dg


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
