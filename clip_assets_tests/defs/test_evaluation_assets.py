"""image_evaluation and threshold_calibration through Dagster, on a real instance in a temp dir."""

import dagster as dg
import pytest

from clip_assets.config.layout import DataLayout
from clip_assets.definitions import build_definitions
from clip_assets.demo.shapes import LABELS_FILE
from clip_assets.instance.execution import materialize, materialize_everything
from clip_assets.tuning.calibration import calibrate, load_labelled_scores
from clip_assets.tuning.labels_file import read_labels_file

EVALUATION = dg.AssetKey("image_evaluation")
CALIBRATION = dg.AssetKey("threshold_calibration")


def latest_metadata(instance, key):
    record = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=1).records[0]
    return record.asset_materialization.metadata


def test_evaluation_and_calibration_assets(settings, instance):
    labelled = settings.model_copy(update={"labels_path": settings.image_root / LABELS_FILE})
    defs = build_definitions(labelled)
    materialize_everything(defs, instance, ["batch-001", "batch-002"])
    materialize(defs, instance, [EVALUATION, CALIBRATION])

    evaluation = latest_metadata(instance, EVALUATION)
    assert evaluation["labelled_images"].value == 20
    assert "data:image/png;base64," in evaluation["precision_recall"].value
    per_category = {r.data["category"]: r.data for r in evaluation["per_category"].value.records}
    assert "circle" in per_category and 0 <= per_category["circle"]["F1"] <= 1

    layout = DataLayout(settings.data_dir)
    report = calibrate(load_labelled_scores(layout, read_labels_file(labelled.labels_path)))
    calibrated = latest_metadata(instance, CALIBRATION)
    assert calibrated["heldout_macro_f1_after"].value == pytest.approx(round(report.macro_f1_after, 4))
    assert [r.data["F1"] for r in calibrated["heldout_after"].value.records] == [round(s.f1, 4) for s in report.after]
    proposal = layout.calibration_proposal_path
    assert proposal.read_text() == report.overrides_toml()


def test_without_labels_evaluation_and_calibration_succeed_saying_how_to_give_some(settings, instance):
    # They re-run on their own after every classification: without labels they must not fail each time.
    defs = build_definitions(settings)
    materialize_everything(defs, instance, ["batch-001"])
    result = materialize(defs, instance, [EVALUATION, CALIBRATION])
    assert result.success
    for key in (EVALUATION, CALIBRATION):
        metadata = latest_metadata(instance, key)
        assert metadata["labelled_images"].value == 0
        assert "CLIP_ASSETS_LABELS" in metadata["no_labels"].value and "clip-assets serve" in metadata["no_labels"].value
    assert not DataLayout(settings.data_dir).calibration_proposal_path.exists()
