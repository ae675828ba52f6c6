"""Labels and tuning: the labels file, the review pages' labels, the adapters, evaluation and calibration; the fine-tuned model
where the deployment names a captions file (CLIP_ASSETS_FINE_TUNE_CAPTIONS)."""

import dagster as dg

from clip_assets.config.settings import Settings
from clip_assets.defs.resources import CaptionedPairs
from clip_assets.defs.tuning.adapters import category_adapters
from clip_assets.defs.tuning.evaluation import image_evaluation, threshold_calibration
from clip_assets.defs.tuning.fine_tuning import captions_file, fine_tuned_model, observe_captions_file
from clip_assets.defs.tuning.labels import labels_file, observe_labels_file, observe_review_labels, review_labels


def definitions(settings: Settings) -> dg.Definitions:
    labels = dg.Definitions(
        assets=[labels_file, review_labels, category_adapters, image_evaluation, threshold_calibration],
        sensors=[observe_labels_file, observe_review_labels],
    )
    if settings.fine_tune_captions is None:
        return labels
    fine_tuning = dg.Definitions(
        assets=[captions_file, fine_tuned_model],
        sensors=[observe_captions_file],
        resources={"captioned_pairs": CaptionedPairs.from_settings(settings)},
    )
    return dg.Definitions.merge(labels, fine_tuning)
