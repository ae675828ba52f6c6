"""Evaluation and calibration against a labelled sample (CLIP_ASSETS_LABELS), as assets.

The bodies call `clip_assets.tuning.calibration` and turn its results into metadata a person can read: a
table per category, the macro F1, and a precision-recall plot.
"""


import dagster as dg

from clip_assets.defs.asset_keys import IMAGE_CLASSIFICATIONS
from clip_assets.defs.conventions import DUCKDB_READER, OWNER
from clip_assets.defs.failures import user_errors_as_failures
from clip_assets.defs.metadata import picture, table
from clip_assets.defs.resources import ImageCollection, LabelledSample
from clip_assets.storage.atomic_files import write_text_atomically
from clip_assets.tuning import calibration
from clip_assets.tuning.evaluation import macro_f1


def _scores_table(scores) -> dg.TableMetadataValue:
    return table(
        [{"category": s.category, "precision": round(s.precision, 4), "recall": round(s.recall, 4),
          "F1": round(s.f1, 4), "TP": s.true_positives, "FP": s.false_positives, "FN": s.false_negatives}
         for s in scores],
        {"category": "string", "precision": "float", "recall": "float", "F1": "float", "TP": "int", "FP": "int",
         "FN": "int"},
    )


@dg.asset(
    deps=[IMAGE_CLASSIFICATIONS],
    group_name="evaluation",
    kinds={"duckdb"},
    tags=DUCKDB_READER,
    owners=[OWNER],
    code_version="1",
)
@user_errors_as_failures
def image_evaluation(collection: ImageCollection, labelled_sample: LabelledSample) -> dg.MaterializeResult:
    """Precision, recall and F1 per category and macro of the current thresholds, on every labelled image."""
    data = labelled_sample.load(collection)
    scores = calibration.evaluate_current(data)
    return dg.MaterializeResult(
        metadata={
            "macro_f1": round(macro_f1(scores), 4),
            "labelled_images": len(data.image_ids),
            "per_category": _scores_table(scores),
            "precision_recall": picture(calibration.precision_recall_plot(data), "precision-recall per category"),
            "labels_without_classifications": len(data.unmatched_labels),
            "unknown_categories": ", ".join(data.unknown_categories) or "none",
        }
    )


@dg.asset(
    deps=[IMAGE_CLASSIFICATIONS],
    group_name="evaluation",
    kinds={"duckdb", "toml"},
    tags=DUCKDB_READER,
    owners=[OWNER],
    code_version="1",
)
@user_errors_as_failures
def threshold_calibration(collection: ImageCollection, labelled_sample: LabelledSample) -> dg.MaterializeResult:
    """Per-category thresholds and neutral margins tuned on part of the labelled images, scored
    before and after on the rest; the proposal is written as a calibrated_thresholds.toml to review."""
    data = labelled_sample.load(collection)
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
