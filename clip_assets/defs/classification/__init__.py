"""Prompts to centroids, embeddings to classifications in DuckDB."""

import dagster as dg

from clip_assets.defs.classification.assets import image_classifications, prompt_centroids
from clip_assets.defs.classification.jobs import prompt_centroids_job
from clip_assets.defs.classification.prompts import observe_prompt_files, prompt_files


def definitions() -> dg.Definitions:
    return dg.Definitions(
        assets=[prompt_files, prompt_centroids, image_classifications],
        jobs=[prompt_centroids_job],
        sensors=[observe_prompt_files],
    )
