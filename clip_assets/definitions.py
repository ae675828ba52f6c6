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
from clip_assets.defs.jobs import classify_image_batch_job, prompt_centroids_job
from clip_assets.defs.schedules import build_rescan_schedule
from clip_assets.defs.sensors import image_batch_discovery
from clip_assets.defs.resources import ClipModelResource, ImageCollection
from clip_assets.settings import Settings

ASSETS = [prompt_files, image_manifest, image_embeddings, prompt_centroids, image_classifications]
EVALUATION_ASSETS = [image_evaluation, threshold_calibration, classification_gallery]


# Steps run in subprocesses forked from a server that imported torch and this code once per run,
# rather than each step importing them again (Dagster's default is `spawn`).
FORKSERVER_EXECUTOR = dg.multiprocess_executor.configured({"start_method": {"forkserver": {}}})


def build_definitions(settings: Settings, executor: dg.ExecutorDefinition | None = None) -> dg.Definitions:
    """`executor`: None runs steps in forked subprocesses; definitions_k8s passes the k8s one."""
    return dg.Definitions(
        executor=executor or FORKSERVER_EXECUTOR,
        assets=ASSETS + EVALUATION_ASSETS,
        sensors=[automation_sensor, image_batch_discovery],
        schedules=[build_rescan_schedule(settings.rescan_cron)],
        jobs=[observe_prompt_files_job, classify_image_batch_job, prompt_centroids_job],
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
