"""The code location: `dagster dev` (workspace.yaml) and `dagster definitions validate` load `defs`."""

from __future__ import annotations

import dagster as dg

from clip_assets.defs.assets import image_classifications, image_embeddings, image_manifest, prompt_centroids, prompt_files
from clip_assets.defs.automation import automation_sensor, observe_prompt_files_job
from clip_assets.defs.evaluation_assets import (
    LabelledSample,
    classification_gallery,
    image_evaluation,
    threshold_calibration,
)
from clip_assets.defs.resources import ClipModelResource, ImageCollection
from clip_assets.settings import Settings

ASSETS = [prompt_files, image_manifest, image_embeddings, prompt_centroids, image_classifications]
EVALUATION_ASSETS = [image_evaluation, threshold_calibration, classification_gallery]


def build_definitions(settings: Settings) -> dg.Definitions:
    return dg.Definitions(
        assets=ASSETS + EVALUATION_ASSETS,
        sensors=[automation_sensor],
        jobs=[observe_prompt_files_job],
        resources={
            "collection": ImageCollection(
                image_root=str(settings.image_root),
                prompts_dir=str(settings.prompts_dir),
                data_dir=str(settings.data_dir),
                max_failure_share=settings.max_failure_share,
            ),
            "clip_model": ClipModelResource(
                model=settings.model,
                pretrained=settings.pretrained,
                device=settings.device,
                batch_size=settings.batch_size,
                num_workers=settings.num_workers,
                file_timeout_s=settings.file_timeout_s,
            ),
            "labelled_sample": LabelledSample(
                labels_path=str(settings.labels_path) if settings.labels_path else None
            ),
        },
    )


defs = build_definitions(Settings.from_env())
