"""Contrastive fine-tuning inside the lineage: the captions file as an observed source, the
`fine_tuned_model` tuned on it (clip_assets.tuning.fine_tuning), and the opt-in that makes the embeddings and
the centroids use it.

Present only where `CLIP_ASSETS_FINE_TUNE_CAPTIONS` names a captions file. `fine_tuned_model` depends
on `captions_file` and is eager: editing the captions re-tunes; its data version is the checkpoint's
content hash, which is also its model identity. With `CLIP_ASSETS_USE_FINE_TUNED`, `image_embeddings`
and `prompt_centroids` depend on it too (`encoded_with_fine_tuned_model`): a new checkpoint makes every batch's
embeddings and the centroids stale, and they re-run (centroids: eager, as for a prompt edit; embeddings:
when the model changed); classification refuses embeddings and centroids of different models in
between. A prompt edit re-runs neither the fine-tuning nor the embeddings.
"""

from pathlib import Path

import dagster as dg

from clip_assets.defs.asset_keys import CAPTIONS_FILE, FINE_TUNED_MODEL, IMAGE_EMBEDDINGS, PROMPT_CENTROIDS
from clip_assets.defs.conventions import GPU_POOL, OWNER
from clip_assets.defs.failures import user_errors_as_failures
from clip_assets.defs.k8s import GPU_STEP_K8S_CONFIG
from clip_assets.defs.observation import file_observation, observation_sensor, observed_file_source, record_if_changed
from clip_assets.defs.resources import CaptionedPairs, ClipModelResource, ImageCollection
from clip_assets.model.fine_tuned_weights import checkpoint_version

CAPTIONS_OBSERVATION_SENSOR = "captions_file_observation"
NO_CAPTIONS = "no-captions"  # the captions file's data version while CLIP_ASSETS_FINE_TUNE_CAPTIONS is unset

# image_embeddings re-run for every batch when the model they are made with changed, once nothing
# they need is missing or running. Not eager: a manifest re-written by itself (the re-scan schedule's
# runs write both) or a new batch's partition does not ask for embeddings here.
WHEN_THE_MODEL_CHANGED = (
    dg.AutomationCondition.any_deps_updated().allow(dg.AssetSelection.assets(FINE_TUNED_MODEL)).since_last_handled()
    & ~dg.AutomationCondition.any_deps_missing()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("when_the_model_changed")


def captions_file_observation(captions_path: Path) -> dg.AssetObservation:
    """An observation of the captions file fine_tuned_model tunes on: its content hash as the data version."""
    return file_observation(CAPTIONS_FILE, captions_path, "CLIP_ASSETS_FINE_TUNE_CAPTIONS", NO_CAPTIONS)


captions_file = observed_file_source(
    CAPTIONS_FILE,
    "The image-caption pairs fine_tuned_model tunes on (CLIP_ASSETS_FINE_TUNE_CAPTIONS). Data version: a hash "
    "of its content. Observed by the captions_file_observation sensor without a run.",
    "csv", "captioned_pairs", lambda captioned_pairs: captions_file_observation(captioned_pairs.path),
)


@dg.asset(
    deps=[CAPTIONS_FILE],
    group_name="fine_tuning",
    kinds={"pytorch"},
    owners=[OWNER],
    code_version="1",
    automation_condition=dg.AutomationCondition.eager(),
    op_tags={"clip_assets/gpu": "true", "dagster-k8s/config": GPU_STEP_K8S_CONFIG},
    pool=GPU_POOL,
)
@user_errors_as_failures
def fine_tuned_model(context: dg.AssetExecutionContext, collection: ImageCollection, clip_model: ClipModelResource,
                     captioned_pairs: CaptionedPairs) -> dg.MaterializeResult:
    """The configured model (CLIP_ASSETS_MODEL, CLIP_ASSETS_PRETRAINED) tuned with open_clip's contrastive loss
    on the captions file's training pairs; a checkpoint named by its content hash, the data version."""
    # deferred: the step imports torch, which loading the code location does not (see clip_assets.defs)
    from clip_assets.tuning.steps import write_fine_tuned_model

    report = write_fine_tuned_model(
        clip_model.model, clip_model.pretrained, captioned_pairs.path, collection.root, collection.layout,
        captioned_pairs.options, clip_model.device, log=context.log.info,
    )
    return dg.MaterializeResult(
        data_version=dg.DataVersion(checkpoint_version(report.checkpoint)),
        metadata={
            "path": dg.MetadataValue.path(str(report.checkpoint)),
            "base_model": report.base_identity,
            "training_pairs": report.training_pairs,
            "heldout_pairs": report.heldout_pairs,
            "heldout_loss_before": report.before.loss,
            "heldout_loss_after": report.after.loss,
            "heldout_retrieval_accuracy_before": report.before.retrieval_accuracy,
            "heldout_retrieval_accuracy_after": report.after.retrieval_accuracy,
            "wise_alpha": report.wise.alpha,
            "report": dg.MetadataValue.md(f"```\n{report.table()}\n```"),
        },
    )


@observation_sensor(
    CAPTIONS_OBSERVATION_SENSOR,
    "Hashes the captions file (CLIP_ASSETS_FINE_TUNE_CAPTIONS) and records an observation of captions_file, "
    "without a run, when the hash changed: fine_tuned_model then re-runs.",
)
def observe_captions_file(context: dg.SensorEvaluationContext, captioned_pairs: CaptionedPairs):
    return record_if_changed(context, captions_file_observation(captioned_pairs.path), "captions file")


def encoded_with_fine_tuned_model(defs: dg.Definitions) -> dg.Definitions:
    """`defs` with image_embeddings and prompt_centroids depending on fine_tuned_model, what they are
    encoded with once the deployment opts in, and the embeddings re-run when it changes."""

    def depend_on_it(spec: dg.AssetSpec) -> dg.AssetSpec:
        spec = spec.replace_attributes(deps=[*spec.deps, dg.AssetDep(FINE_TUNED_MODEL)])
        return spec.replace_attributes(automation_condition=WHEN_THE_MODEL_CHANGED) if spec.key == IMAGE_EMBEDDINGS else spec

    return defs.map_resolved_asset_specs(func=depend_on_it, selection=dg.AssetSelection.assets(IMAGE_EMBEDDINGS, PROMPT_CENTROIDS))
