"""The job that builds the centroids from the prompt files (the discovery sensor's first run)."""

import dagster as dg

from clip_assets.defs.asset_keys import CATEGORY_ADAPTERS, PROMPT_CENTROIDS, PROMPT_FILES

PROMPT_CENTROIDS_JOB = "prompt_centroids_from_prompt_files"

# Observes the prompt files and builds the centroids in the same run, so the automation sensor sees
# the observation as already handled and does not build them a second time.
prompt_centroids_job = dg.define_asset_job(
    PROMPT_CENTROIDS_JOB,
    selection=dg.AssetSelection.assets(PROMPT_FILES, PROMPT_CENTROIDS, CATEGORY_ADAPTERS),
    description="Observe prompts/ and build the prompt centroids (and the adapters on top of them).",
)
