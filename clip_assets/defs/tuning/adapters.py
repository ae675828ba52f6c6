"""`category_adapters`: the few-shot adapters learnt from the labels (clip_assets.tuning.adapters).

`category_adapters` depends on `prompt_centroids`, `labels_file` and `review_labels` (the review pages'
verdicts), and `image_classifications` on it: editing the labels, or a click in the review pages,
re-runs the adapters and the classifications; editing a prompt re-runs the
centroids, the adapters and the classifications; the embeddings never. The adapters read the labelled
images' stored embeddings when they run; images embedded later count from the next run.
"""

import dagster as dg

from clip_assets.defs.asset_keys import LABELS_FILE, PROMPT_CENTROIDS, REVIEW_LABELS
from clip_assets.defs.conventions import DUCKDB_READER, OWNER
from clip_assets.defs.failures import user_errors_as_failures
from clip_assets.defs.metadata import table
from clip_assets.defs.resources import ImageCollection, LabelledSample


@dg.asset(
    deps=[PROMPT_CENTROIDS, LABELS_FILE, REVIEW_LABELS],
    group_name="prompts",
    kinds={"numpy"},
    owners=[OWNER],
    code_version="2",  # 2: thresholds calibrated on the whole tuning half
    automation_condition=dg.AutomationCondition.eager(),
    tags=DUCKDB_READER,  # reads the centroids
)
@user_errors_as_failures
def category_adapters(collection: ImageCollection, labelled_sample: LabelledSample) -> dg.MaterializeResult:
    """Per prompt file, none, a cache model or a linear head on top of the prompt centroids, chosen and
    fitted on the tuning half of the labelled images (at most `adapter_shots` per category); thresholds
    calibrated on the adapted scores of the whole tuning half.
    Without labels: no adapters, and classification is zero-shot."""
    # deferred: the step imports torch, which loading the code location does not (see clip_assets.defs)
    from clip_assets.tuning.steps import write_adapters

    summary = write_adapters(collection.layout, labelled_sample.path, labelled_sample.adapter_shots or None)
    metadata = {"adapter_version": summary.version, "path": dg.MetadataValue.path(str(collection.layout.adapters_path))}
    if summary.adapters is not None:
        metadata |= {
            "labelled_images": summary.labelled_images,
            "heldout_images_unused": summary.heldout_images,
            "labels_without_embeddings": summary.without_embeddings,
            "unknown_categories": ", ".join(summary.unknown_categories) or "none",
            "prompt_files": table(
                [{"file": f.source, "adapter": f.description, "images": int(f.images_used),
                  "thresholds_calibrated_on": int(f.calibration_images),
                  "cross_validated_macro_f1": ", ".join(f"{k} {v:.3f}" for k, v in f.cv_macro_f1.items()) or "-"}
                 for f in summary.adapters.files],
                {"file": "string", "adapter": "string", "images": "int", "thresholds_calibrated_on": "int",
                 "cross_validated_macro_f1": "string"},
            ),
        }
    return dg.MaterializeResult(data_version=dg.DataVersion(summary.version), metadata=metadata)
