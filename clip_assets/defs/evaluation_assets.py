"""Evaluation and calibration against a labelled sample (CLIP_ASSETS_LABELS), and the gallery, as assets.

The bodies call `clip_assets.calibration` and turn its results into metadata a person can read: a
table per category, the macro F1, and a precision-recall plot.
"""

from pathlib import Path

import dagster as dg

from clip_assets import calibration
from clip_assets.defs.assets import OWNER, _markdown_table
from clip_assets.defs.resources import ImageCollection
from clip_assets.evaluation import macro_f1
from clip_assets.gallery import write_gallery
from clip_assets.layout import write_text_atomically
from clip_assets.plots import png_markdown


class LabelledSample(dg.ConfigurableResource):
    """Labels a person assigned to a sample of images (CSV or parquet), and how to calibrate on them."""

    labels_path: str | None = None
    target_precision: float | None = None
    heldout_fraction: float = calibration.DEFAULT_HELDOUT_FRACTION

    def load(self, collection: ImageCollection) -> calibration.LabelledScores:
        if not self.labels_path:
            raise dg.Failure(
                description="No labels file: set CLIP_ASSETS_LABELS to a CSV or parquet file with a 'path' (or "
                "'image_id') column and a 'labels' column (categories separated by ';', or 'none')."
            )
        return calibration.load_labelled_scores(
            collection.layout, calibration.read_labels_file(Path(self.labels_path))
        )


def _scores_table(scores) -> dg.MarkdownMetadataValue:
    return _markdown_table(
        [{"category": s.category, "precision": f"{s.precision:.3f}", "recall": f"{s.recall:.3f}",
          "F1": f"{s.f1:.3f}", "TP": s.true_positives, "FP": s.false_positives, "FN": s.false_negatives}
         for s in scores]
    )


@dg.asset(
    deps=["image_classifications"],
    group_name="evaluation",
    kinds={"duckdb"},
    owners=[OWNER],
    code_version="1",
)
def image_evaluation(collection: ImageCollection, labelled_sample: LabelledSample) -> dg.MaterializeResult:
    """Precision, recall and F1 per category and macro of the current thresholds, on every labelled image."""
    data = labelled_sample.load(collection)
    scores = calibration.evaluate_current(data)
    return dg.MaterializeResult(
        metadata={
            "macro_f1": round(macro_f1(scores), 4),
            "labelled_images": len(data.image_ids),
            "per_category": _scores_table(scores),
            "precision_recall": dg.MetadataValue.md(
                png_markdown(calibration.precision_recall_plot(data), "precision-recall per category")
            ),
            "labels_without_classifications": len(data.unmatched_labels),
            "unknown_categories": ", ".join(data.unknown_categories) or "none",
        }
    )


@dg.asset(
    deps=["image_classifications"],
    group_name="evaluation",
    kinds={"toml"},
    owners=[OWNER],
    code_version="1",
)
def threshold_calibration(collection: ImageCollection, labelled_sample: LabelledSample) -> dg.MaterializeResult:
    """Per-category thresholds and neutral margins tuned on part of the labelled images, scored
    before and after on the rest; the proposal is written as a calibrated_thresholds.toml to review."""
    data = labelled_sample.load(collection)
    report = calibration.calibrate(data, labelled_sample.target_precision, labelled_sample.heldout_fraction)
    proposal = collection.layout.data_dir / "calibration" / "calibrated_thresholds.toml"
    write_text_atomically(report.overrides_toml(), proposal)
    return dg.MaterializeResult(
        metadata={
            "heldout_macro_f1_before": round(report.macro_f1_before, 4),
            "heldout_macro_f1_after": round(report.macro_f1_after, 4),
            "tuning_images": report.tuning_images,
            "heldout_images": report.heldout_images,
            "heldout_after": _scores_table(report.after),
            "heldout_before": _scores_table(report.before),
            "precision_recall": dg.MetadataValue.md(
                png_markdown(calibration.precision_recall_plot(data, report), "precision-recall, now and calibrated")
            ),
            "proposal": dg.MetadataValue.path(str(proposal)),
            "apply": dg.MetadataValue.md(
                f"Review, then copy `{proposal}` into the prompts folder ({collection.prompts_dir}) "
                "or run `clip-assets calibrate --labels ... --write`."
            ),
            "overrides": dg.MetadataValue.md(f"```toml\n{report.overrides_toml()}```"),
        }
    )


@dg.asset(
    deps=["image_classifications"],
    group_name="evaluation",
    kinds={"html"},
    owners=[OWNER],
    code_version="1",
)
def classification_gallery(context: dg.AssetExecutionContext, collection: ImageCollection) -> dg.MaterializeResult:
    """A static HTML page per run: per category, thumbnails of the best matched images and of the
    near misses just under the threshold, with their scores."""
    out_dir = collection.layout.data_dir / "gallery" / context.run.run_id
    page = write_gallery(collection.layout, Path(collection.image_root), out_dir,
                         title=f"clip-assets gallery, run {context.run.run_id[:8]}")
    return dg.MaterializeResult(
        metadata={
            "page": dg.MetadataValue.path(str(page)),
            "open": dg.MetadataValue.md(f"Open `file://{page}` in a browser."),
            "thumbnails": len(list((out_dir / "thumbs").glob("*.jpg"))),
        }
    )
