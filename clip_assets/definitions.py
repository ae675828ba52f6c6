"""The code location: `dagster dev` (workspace.yaml) and `dagster definitions validate` load `defs`."""

from __future__ import annotations

import dagster as dg

from clip_assets.defs.assets import image_classifications, image_embeddings, image_manifest, prompt_centroids, prompt_files
from clip_assets.defs.adapter_assets import category_adapters, labels_file
from clip_assets.defs.automation import automation_sensor, observe_labels_file, observe_prompt_files
from clip_assets.defs.fine_tuning_assets import (
    captions_file,
    fine_tuned_model,
    observe_captions_file,
    use_fine_tuned_model,
)
from clip_assets.defs.evaluation_assets import (
    classification_gallery,
    image_evaluation,
    threshold_calibration,
)
from clip_assets.defs.index_assets import image_search_index, near_duplicates
from clip_assets.defs.jobs import classify_image_batch_job, prompt_centroids_job
from clip_assets.defs.schedules import build_rescan_schedule
from clip_assets.defs.sensors import image_batch_discovery, split_failed_batch_runs
from clip_assets.defs.resources import CaptionedPairs, ClipModelResource, ImageCollection, LabelledSample
from clip_assets.config.settings import Settings

ASSETS = [prompt_files, labels_file, image_manifest, image_embeddings, prompt_centroids, category_adapters,
          image_classifications]
EVALUATION_ASSETS = [image_evaluation, threshold_calibration, classification_gallery]
INDEX_ASSETS = [image_search_index, near_duplicates]


# Steps run in the run's own process, which has imported torch and this code already. The steps of
# every job here form a chain (manifest -> embeddings -> classifications), so subprocesses per step
# would run nothing in parallel, while each costs a fresh import of torch and the code location
# (about 10 s on 2 cores, whether spawned or forked from a per-run forkserver). Pools (the GPU, the
# DuckDB writer) are claimed the same way in process.
IN_PROCESS_EXECUTOR = dg.in_process_executor


def fine_tuning_definitions(settings: Settings) -> tuple[list, list, dict]:
    """(assets, sensors, resources) of fine-tuning inside the lineage: none unless CLIP_ASSETS_FINE_TUNE_CAPTIONS
    names a captions file; with CLIP_ASSETS_USE_FINE_TUNED, the embeddings and centroids are encoded with
    fine_tuned_model (clip_assets.defs.fine_tuning_assets)."""
    if settings.fine_tune_captions is None:
        return ASSETS, [], {}
    assets = [captions_file, fine_tuned_model] + ASSETS
    if settings.use_fine_tuned:
        wired = dict(zip((image_embeddings, prompt_centroids), use_fine_tuned_model(image_embeddings, prompt_centroids)))
        assets = [wired.get(a, a) for a in assets]
    resources = {"captioned_pairs": CaptionedPairs(
        captions_path=str(settings.fine_tune_captions), epochs=settings.fine_tune_epochs, lr=settings.fine_tune_lr,
        lock_image=settings.fine_tune_lock_image, wise_alpha=settings.fine_tune_wise_alpha,
    )}
    return assets, [observe_captions_file], resources


def build_definitions(settings: Settings, executor: dg.ExecutorDefinition | None = None) -> dg.Definitions:
    """`executor`: None runs steps in the run's process; definitions_k8s passes the k8s one."""
    pipeline_assets, fine_tuning_sensors, fine_tuning_resources = fine_tuning_definitions(settings)
    return dg.Definitions(
        executor=executor or IN_PROCESS_EXECUTOR,
        assets=pipeline_assets + EVALUATION_ASSETS + INDEX_ASSETS,
        sensors=[observe_prompt_files, observe_labels_file, automation_sensor, image_batch_discovery, split_failed_batch_runs,
                 *fine_tuning_sensors],
        schedules=[build_rescan_schedule(settings.rescan_cron)],
        jobs=[classify_image_batch_job, prompt_centroids_job],
        resources={
            "collection": ImageCollection(
                image_root=str(settings.image_root),
                prompts_dir=str(settings.prompts_dir),
                data_dir=str(settings.data_dir),
                max_failure_share=settings.max_failure_share,
                duplicate_threshold=settings.duplicate_threshold,
            ),
            "clip_model": ClipModelResource(
                model=settings.model,
                pretrained=settings.pretrained,
                device=settings.device,
                batch_size=settings.batch_size,
                num_workers=settings.num_workers,
                file_timeout_s=settings.file_timeout_s,
                chunk_rows=settings.chunk_rows,
                flush_interval_s=settings.flush_interval_s,
                decode=settings.decode,
                precision=settings.precision,
                channels_last=settings.channels_last,
                compile_model=settings.compile_model,
                gpu_lock_dir=str(settings.gpu_lock_dir),
                use_fine_tuned=settings.use_fine_tuned,
            ),
            "labelled_sample": LabelledSample(
                labels_path=str(settings.labels_path) if settings.labels_path else None,
                adapter_shots=settings.adapter_shots,
            ),
            **fine_tuning_resources,
        },
    )


defs = build_definitions(Settings.from_env())
