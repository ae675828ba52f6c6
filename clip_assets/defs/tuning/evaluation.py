"""Evaluation and calibration against the labelled images (CLIP_ASSETS_LABELS and the review pages' verdicts), as assets.

The bodies call `clip_assets.tuning.calibration` and turn its results into metadata a person can read: a
table per category, the macro F1, and a precision-recall plot; `image_evaluation` also shows the
precision and recall estimated from the estimate queue's labels, with their intervals
(clip_assets.tuning.precision_estimate).

Both re-run on their own when the classifications change, so new labels (which re-run the adapters,
then the classifications) re-evaluate and re-calibrate once, on the new classifications. Without any
labels they record that there are none, and how to give some, instead of failing on every new batch.
"""


import dagster as dg

from clip_assets.defs.asset_keys import IMAGE_CLASSIFICATIONS, LABELS_FILE, REVIEW_LABELS
from clip_assets.defs.conventions import DUCKDB_READER, OWNER
from clip_assets.defs.failures import user_errors_as_failures
from clip_assets.defs.metadata import picture, table
from clip_assets.defs.resources import NO_LABELS, ImageCollection, LabelledSample
from clip_assets.storage.atomic_files import write_text_atomically
from clip_assets.tuning import calibration
from clip_assets.tuning.evaluation import macro_f1
from clip_assets.tuning.precision_estimate import ROW_COLUMNS, estimate_precision

# New labels always bring new adapters and then new classifications (category_adapters is eager on
# them): evaluating on the classifications they replace as well would run twice per label change.
AFTER_CLASSIFICATIONS = dg.AutomationCondition.eager().ignore(dg.AssetSelection.assets(LABELS_FILE, REVIEW_LABELS))


def _scores_table(scores) -> dg.TableMetadataValue:
    return table(
        [{"category": s.category, "precision": round(s.precision, 4), "recall": round(s.recall, 4),
          "F1": round(s.f1, 4), "TP": s.true_positives, "FP": s.false_positives, "FN": s.false_negatives}
         for s in scores],
        {"category": "string", "precision": "float", "recall": "float", "F1": "float", "TP": "int", "FP": "int",
         "FN": "int"},
    )


def _no_labels() -> dict:
    return {"labelled_images": 0, "no_labels": dg.MetadataValue.md(NO_LABELS)}


@dg.asset(
    deps=[IMAGE_CLASSIFICATIONS, LABELS_FILE, REVIEW_LABELS],
    group_name="evaluation",
    kinds={"duckdb"},
    tags=DUCKDB_READER,
    owners=[OWNER],
    code_version="2",  # 2: the review pages' labels, the estimate table, no failure without labels
    automation_condition=AFTER_CLASSIFICATIONS,
)
@user_errors_as_failures
def image_evaluation(collection: ImageCollection, labelled_sample: LabelledSample) -> dg.MaterializeResult:
    """Precision, recall and F1 per category and macro of the current thresholds, on every labelled image;
    and per category precision and recall estimated from the estimate queue's labels alone, with 95%
    intervals and how many more labels would halve them."""
    estimates = estimate_precision(collection.layout)
    estimated = {
        "estimated_from_review": table([e.as_row() for e in estimates], ROW_COLUMNS),
        "estimate_labels": sum(e.labelled_matches + e.labelled_non_matches for e in estimates),
    }
    data = labelled_sample.load(collection)
    if data is None:
        return dg.MaterializeResult(metadata=_no_labels() | estimated)
    scores = calibration.evaluate_current(data)
    return dg.MaterializeResult(
        metadata=estimated | {
            "macro_f1": round(macro_f1(scores), 4),
            "labelled_images": len(data.image_ids),
            "per_category": _scores_table(scores),
            "precision_recall": picture(calibration.precision_recall_plot(data), "precision-recall per category"),
            "labels_without_classifications": len(data.unmatched_labels),
            "unknown_categories": ", ".join(data.unknown_categories) or "none",
        }
    )


@dg.asset(
    deps=[IMAGE_CLASSIFICATIONS, LABELS_FILE, REVIEW_LABELS],
    group_name="evaluation",
    kinds={"duckdb", "toml"},
    tags=DUCKDB_READER,
    owners=[OWNER],
    code_version="2",  # 2: the review pages' labels, no failure without labels
    automation_condition=AFTER_CLASSIFICATIONS,
)
@user_errors_as_failures
def threshold_calibration(collection: ImageCollection, labelled_sample: LabelledSample) -> dg.MaterializeResult:
    """Per-category thresholds and neutral margins tuned on part of the labelled images, scored
    before and after on the rest; the proposal is written as a calibrated_thresholds.toml to review."""
    data = labelled_sample.load(collection)
    if data is None:
        return dg.MaterializeResult(metadata=_no_labels())
    report = calibration.calibrate(data, labelled_sample.target_precision, labelled_sample.heldout_fraction)
    proposal = collection.layout.calibration_proposal_path
    write_text_atomically(report.overrides_toml(), proposal)
    return dg.MaterializeResult(
        metadata={
            "heldout_macro_f1_before": round(report.macro_f1_before, 4),
            "heldout_macro_f1_after": round(report.macro_f1_after, 4),
            "tuning_images": report.tuning_images,
            "heldout_images": report.heldout_images,
            "heldout_after": _scores_table(report.after),
            "heldout_before": _scores_table(report.before),
            "precision_recall": picture(
                calibration.precision_recall_plot(data, report), "precision-recall, now and calibrated"),
            "proposal": dg.MetadataValue.path(str(proposal)),
            "apply": dg.MetadataValue.md(
                f"Review, then copy `{proposal}` into the prompts folder ({collection.prompts_dir}) "
                "or run `clip-assets calibrate --labels ... --write`."
            ),
            "overrides": dg.MetadataValue.md(f"```toml\n{report.overrides_toml()}```"),
        }
    )
