"""Evaluation and calibration: the threshold search on known numbers, then the whole path on real
classifications of the generated collection (tiny model, real DuckDB file, real prompt files)."""


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_assets.classification.prompts import (
    OVERRIDES_FILE,
    PromptFileError,
    load_categories,
    prompt_files,
    prompt_version,
)
from clip_assets.classification.steps import write_centroids
from clip_assets.cli import main
from clip_assets.demo.run import matched_labels
from clip_assets.demo.shapes import LABELS_FILE, read_labels
from clip_assets.storage.warehouse import read_centroids
from clip_assets.tuning.calibration import (
    calibrate,
    choose_threshold,
    evaluate_current,
    is_heldout,
    load_labelled_scores,
    stable_fraction,
    write_overrides,
)
from clip_assets.tuning.evaluation import score_labels
from clip_assets.tuning.labels_file import LabelsFileError, read_labels_file

BATCHES = ["batch-001", "batch-002"]


def test_labels_file_csv_and_parquet(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("path,labels\na/1.jpg,cat; dog\na/2.jpg,none\na/3.jpg,\n")
    rows = read_labels_file(path)
    assert rows.key == "path" and rows.labels == {"a/1.jpg": {"cat", "dog"}, "a/2.jpg": set(), "a/3.jpg": set()}
    pq.write_table(pa.table({"image_id": ["x", "y"], "categories": ["cat", "none"]}), tmp_path / "l.parquet")
    assert read_labels_file(tmp_path / "l.parquet").labels == {"x": {"cat"}, "y": set()}
    (tmp_path / "bad.csv").write_text("file,tags\na,b\n")
    with pytest.raises(LabelsFileError, match="'path' or 'image_id'"):
        read_labels_file(tmp_path / "bad.csv")


def test_best_f1_threshold_separates_separable_scores():
    score = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    truth = np.array([True, True, True, False, False, False])
    choice = choose_threshold(score, np.full(6, np.nan), truth, current_margin=0.0)
    assert choice.f1 == 1.0 and 0.3 < choice.threshold < 0.7


def test_target_precision_trades_recall_for_precision():
    rng = np.random.default_rng(0)
    truth = rng.random(400) < 0.4
    score = truth * 0.3 + rng.normal(0, 0.2, 400)
    best_f1 = choose_threshold(score, np.full(400, np.nan), truth, 0.0)
    precise = choose_threshold(score, np.full(400, np.nan), truth, 0.0, target_precision=0.95)
    assert precise.reached_target and precise.precision >= 0.95
    assert precise.threshold > best_f1.threshold and precise.recall < best_f1.recall
    predicted = score >= precise.threshold
    assert (predicted & truth).sum() / predicted.sum() >= 0.95


def test_neutral_margin_is_tuned_when_it_helps():
    # Scores cannot tell the classes apart; the neutral gap can.
    truth = np.array([True] * 5 + [False] * 5)
    score = np.full(10, 0.5)
    gap = np.where(truth, 0.2, -0.2)
    choice = choose_threshold(score, gap, truth, current_margin=-1.0)
    assert choice.f1 == 1.0 and -0.2 < choice.neutral_margin <= 0.2


def test_heldout_split_is_stable_and_covers_both_sides():
    ids = [f"image-{i}" for i in range(1000)]
    first = [is_heldout(i) for i in ids]
    assert first == [is_heldout(i) for i in ids]
    assert 400 < sum(first) < 600


def test_stable_fractions_are_the_ones_splits_and_folds_were_drawn_with():
    # pinned: a change here moves images across the held-out split and the adapters' folds
    assert stable_fraction("batch-001/a.jpg") == 0.10276308424802115
    assert stable_fraction("batch-001/a.jpg", "fold") == 0.4698439234200667
    assert is_heldout("batch-001/a.jpg", 0.11) and not is_heldout("batch-001/a.jpg", 0.10)


def test_evaluation_matches_the_demo_scoring_and_calibration_scores_only_heldout(settings, classified, clip):
    labels_path = settings.image_root / LABELS_FILE
    data = load_labelled_scores(classified, read_labels_file(labels_path))
    assert len(data.image_ids) == 20 and not data.unknown_categories
    # Same numbers as scoring the stored matched flags the demo's way.
    expected = score_labels(matched_labels(classified), read_labels(labels_path), data.categories)
    assert [(s.true_positives, s.false_positives, s.false_negatives) for s in evaluate_current(data)] == [
        (s.true_positives, s.false_positives, s.false_negatives) for s in expected
    ]
    report = calibrate(data)
    heldout = sum(is_heldout(i) for i in data.image_ids)
    assert report.heldout_images == heldout and report.tuning_images == 20 - heldout
    for j, s in enumerate(report.before):
        assert s.true_positives + s.false_negatives == sum(
            data.truth[i, j] for i, image_id in enumerate(data.image_ids) if is_heldout(image_id)
        )


def test_written_thresholds_flow_into_classification(settings, classified, clip):
    data = load_labelled_scores(classified, read_labels_file(settings.image_root / LABELS_FILE))
    report = calibrate(data)
    assert report.choices, "some category had positives on the tuning side"
    version_before = prompt_version(settings.prompts_dir)
    path = write_overrides(report, settings.prompts_dir)
    assert path.name == OVERRIDES_FILE and path not in prompt_files(settings.prompts_dir)
    assert prompt_version(settings.prompts_dir) != version_before  # automation re-runs centroids
    by_name = {c.name: c for c in load_categories(settings.prompts_dir)}
    for name in report.choices:
        j = report.categories.index(name)
        assert by_name[name].threshold == pytest.approx(report.new_thresholds[j], abs=1e-6)
    write_centroids(clip, settings.prompts_dir, classified)
    stored = read_centroids(classified.duckdb_path)
    np.testing.assert_allclose(stored.thresholds, np.round(report.new_thresholds, 6), atol=1e-6)


def test_override_for_an_unknown_category_is_refused(settings):
    (settings.prompts_dir / OVERRIDES_FILE).write_text("[categories.unicorn]\nthreshold = 0.1\n")
    with pytest.raises(PromptFileError, match="categories.unicorn"):
        load_categories(settings.prompts_dir)


def test_cli_calibrate_prints_before_after_and_writes(settings, classified, monkeypatch, capsys):
    monkeypatch.setenv("CLIP_ASSETS_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("CLIP_ASSETS_PROMPTS_DIR", str(settings.prompts_dir))
    labels = settings.image_root / LABELS_FILE
    assert main(["calibrate", "--labels", str(labels), "--target-precision", "0.8"]) == 0
    out = capsys.readouterr().out
    assert "macro F1 on held-out images" in out and "[categories." in out
    assert not (settings.prompts_dir / OVERRIDES_FILE).exists()
    assert main(["calibrate", "--labels", str(labels), "--write"]) == 0
    assert (settings.prompts_dir / OVERRIDES_FILE).is_file()
    assert main(["calibrate", "--labels", str(settings.image_root / "missing.csv")]) == 1


def test_labelled_scores_are_the_labelled_images_rows_of_a_multi_batch_collection(tmp_path):
    """Only the labelled images' rows are read; they are the same whether the labels name paths or ids."""
    import numpy as np
    import pyarrow.parquet as pq

    from clip_assets.storage.warehouse import connect
    from clip_assets.tuning.calibration import evaluate_current
    from clip_assets.tuning.labels_file import LabelRows
    from clip_assets_tests.support.synthetic_collection import tied_collection

    layout = tied_collection(tmp_path, images=300, batches=3)
    manifest = pq.read_table(layout.manifest_dir).to_pylist()
    chosen = manifest[::7]  # across the three batches
    by_path = {r["path"]: ({"dog"} if k % 2 else {"cat", "kind"}) for k, r in enumerate(chosen)}
    by_path["b0/no-such.jpg"] = {"dog", "horse"}
    data = load_labelled_scores(layout, LabelRows("path", by_path))
    same = load_labelled_scores(layout, LabelRows("image_id", {r["image_id"]: by_path[r["path"]] for r in chosen}))
    assert data.unmatched_labels == ["b0/no-such.jpg"] and data.unknown_categories == ["horse"]
    assert sorted(data.paths) == sorted(r["path"] for r in chosen) and sorted(data.image_ids) == sorted(same.image_ids)
    order = [same.image_ids.index(i) for i in data.image_ids]
    for name in ("score", "neutral_gap", "matched", "truth"):
        np.testing.assert_array_equal(getattr(data, name), getattr(same, name)[order])
    with connect(layout.duckdb_path, read_only=True) as con:  # every row of the collection, the slow way
        every = {(i, c): (v, g, m) for i, c, v, g, m in con.execute(
            "SELECT image_id, category, CASE WHEN mode = 'single_label' THEN probability ELSE score END, "
            "pos_sim - neutral_sim, matched FROM image_classifications").fetchall()}
    for i, image_id in enumerate(data.image_ids):
        for j, category in enumerate(data.categories):
            value, gap, matched = every[(image_id, category)]
            assert data.score[i, j] == np.float64(value) and data.matched[i, j] == matched
            assert (np.isnan(data.neutral_gap[i, j]) if gap is None else data.neutral_gap[i, j] == np.float64(gap))
            assert data.truth[i, j] == (category in by_path[data.paths[i]])
    assert [s.true_positives + s.false_negatives for s in evaluate_current(data)] == [
        sum(c in labels for p, labels in by_path.items() if p in data.paths) for c in data.categories]
