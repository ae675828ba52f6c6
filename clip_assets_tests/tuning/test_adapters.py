"""Few-shot adapters: exactly zero-shot without labels, better than zero-shot where the prompts are
poor, never chosen or fitted on the held-out half, and recorded in the classification rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from clip_assets.classification.centroids import CentroidSet
from clip_assets.classification.rules import score_matrices
from clip_assets.classification.steps import write_classifications
from clip_assets.storage.damaged_files import DamagedFileError
from clip_assets.storage.warehouse import connect, read_centroids
from clip_assets.tuning.adapter_evaluation import (
    LabelledEmbeddings,
    compare,
    fit_on_tuning_half,
    load_labelled_embeddings,
    tuning_sample,
)
from clip_assets.tuning.adapter_store import AdapterMismatchError, adapters_for, read_adapters, write_adapter_file
from clip_assets.tuning.adapters import CACHE, CANDIDATES, HEAD, NONE, Candidate, fit_adapters, stratified_sample
from clip_assets.tuning.calibration import is_heldout
from clip_assets.tuning.evaluation import macro_f1
from clip_assets.tuning.labels_file import read_labels_file
from clip_assets.tuning.steps import write_adapters


def _centroids(positive: np.ndarray, mode: str = "multi_label") -> CentroidSet:
    c, d = positive.shape
    names = [f"c{i}" for i in range(c)]
    return CentroidSet(
        categories=names, sources=["synthetic.toml"] * c, thresholds=np.zeros(c) if mode != "single_label" else np.zeros(c),
        neutral_margins=np.zeros(c), positive=positive.astype(np.float32), negative=np.zeros((c, d), np.float32),
        neutral=np.zeros((c, d), np.float32), has_negative=np.zeros(c, bool), has_neutral=np.zeros(c, bool),
        modes=[mode] * c, top_k=np.ones(c, dtype=np.int64), logit_scale=50.0,
        prompt_counts={(n, "positive"): 1 for n in names}, prompt_hashes={(n, "positive"): "h" for n in names},
        model="synthetic", prompt_version="v1",
    )


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def poor_prompts_case(n: int = 300, categories: int = 3, dim: int = 32, seed: int = 0, mode: str = "multi_label"):
    """Images in clusters, one category each; each text centroid nearer the next category's cluster
    than its own, which no threshold can undo."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(categories, dim)))
    text = _unit(0.6 * centres + 0.8 * np.roll(centres, -1, axis=0))
    which = rng.integers(0, categories, size=n)
    embeddings = _unit(centres[which] + 0.3 * rng.normal(size=(n, dim)) / np.sqrt(dim) * 4)
    ids = [f"img-{seed}-{i:05d}" for i in range(n)]
    truth = np.eye(categories, dtype=bool)[which]
    data = LabelledEmbeddings(ids, embeddings, truth, np.array([is_heldout(i) for i in ids]))
    return data, _centroids(text, mode)


def test_without_labels_the_adapted_scores_are_the_zero_shot_ones():
    data, centroids = poor_prompts_case()
    none = LabelledEmbeddings([], np.empty((0, centroids.dim), np.float32), np.zeros((0, 3), bool), np.zeros(0, bool))
    adapters = fit_on_tuning_half(none, centroids, shots=None, version="v")
    assert [f.kind for f in adapters.files] == [NONE]
    zero_shot = score_matrices(data.embeddings, centroids)
    adapted = score_matrices(data.embeddings, centroids, adapters=adapters)
    for key in ("pos", "score", "matched", "thresholds", "neutral_margins"):
        np.testing.assert_array_equal(adapted[key], zero_shot[key])
    # a head forced on images none of which shows a category learns nothing: still exactly zero-shot
    nothing = np.zeros((20, 3), bool)
    head = fit_adapters([f"i{k}" for k in range(20)], data.embeddings[:20], nothing, centroids, "v",
                        [Candidate(HEAD, decay=0.01)])
    np.testing.assert_array_equal(score_matrices(data.embeddings, centroids, adapters=head)["score"], zero_shot["score"])


@pytest.mark.parametrize("kind", [CACHE, HEAD])
@pytest.mark.parametrize("mode", ["multi_label", "single_label"])
def test_each_adapter_beats_zero_shot_and_calibration_on_held_out_images(kind, mode):
    data, centroids = poor_prompts_case(mode=mode)
    candidates = [c for c in CANDIDATES if c.kind in (NONE, kind)]
    report = compare(data, centroids, shots=16, candidates=candidates)
    assert [f.kind for f in report.adapters.files] == [kind]
    assert report.labels_per_category.max() <= 16
    zero_shot, calibrated, adapted = macro_f1(report.zero_shot), macro_f1(report.calibrated), macro_f1(report.adapted)
    assert adapted > max(zero_shot, calibrated) + 0.1, (zero_shot, calibrated, adapted)


@pytest.mark.parametrize("shots", [None, 8])
def test_the_held_out_half_never_feeds_the_choice_the_fit_or_a_threshold(shots):
    data, centroids = poor_prompts_case()
    before = fit_on_tuning_half(data, centroids, shots=shots, version="v")
    rng = np.random.default_rng(5)
    held = data.heldout
    scrambled = dataclasses.replace(
        data,
        truth=np.where(held[:, None], rng.random(data.truth.shape) < 0.5, data.truth),
        embeddings=np.where(held[:, None], _unit(rng.normal(size=data.embeddings.shape)), data.embeddings),
    )
    after = fit_on_tuning_half(scrambled, centroids, shots=shots, version="v")
    assert before.files[0].kind != NONE
    for a, b in zip(before.files, after.files):
        assert (a.kind, a.description, a.cv_macro_f1, a.images_used, a.calibration_images) == (
            b.kind, b.description, b.cv_macro_f1, b.images_used, b.calibration_images)
        for name in ("thresholds", "neutral_margins", "keys", "values", "alpha", "weight_change", "applies"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None) and (x is None or np.array_equal(x, y)), name


def test_with_shots_the_correction_learns_from_the_shots_and_the_thresholds_from_the_whole_tuning_half():
    data, centroids = poor_prompts_case()
    tuning, learn = tuning_sample(data, 8)
    assert len(learn) < len(tuning) and data.truth[tuning[learn]].sum(0).max() <= 8
    others = np.setdiff1d(tuning, tuning[learn])
    before = fit_on_tuning_half(data, centroids, shots=8, version="v")
    # Every tuning image outside the shots is labelled with the first category only.
    relabelled = dataclasses.replace(data, truth=data.truth.copy())
    relabelled.truth[others] = np.eye(3, dtype=bool)[0]
    assert np.array_equal(tuning_sample(relabelled, 8)[1], learn)  # the same shots, with the same labels
    after = fit_on_tuning_half(relabelled, centroids, shots=8, version="v")
    a, b = before.files[0], after.files[0]
    assert a.kind != NONE
    assert (a.images_used, a.calibration_images) == (len(learn), len(tuning))
    assert a.labels_used.tolist() == data.truth[tuning[learn]].sum(0).tolist()
    # What the correction learnt depends on the shots only ...
    assert (a.kind, a.description, a.cv_macro_f1) == (b.kind, b.description, b.cv_macro_f1)
    for name in ("keys", "values", "alpha", "weight_change", "applies"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None) and (x is None or np.array_equal(x, y)), name
    # ... its thresholds on every tuning image's label.
    assert not np.array_equal(a.thresholds, b.thresholds)
    # Those thresholds fit the corrected scores (each image outside the shots scored through the
    # correction): on held-out images the adapter beats calibration by far, where the prompts are poor.
    report = compare(data, centroids, shots=8)
    print(f"8 shots: calibrated {macro_f1(report.calibrated):.3f}, adapted {macro_f1(report.adapted):.3f}")
    assert macro_f1(report.adapted) >= macro_f1(report.calibrated) + 0.2


def test_with_too_few_shots_to_choose_a_correction_the_thresholds_are_calibrated_all_the_same():
    data, centroids = poor_prompts_case()
    report = compare(data, centroids, shots=1)  # 3 images learn: too few for five folds
    f = report.adapters.files[0]
    assert f.kind == NONE and f.calibration_images == report.tuning_images
    assert report.adapted == report.calibrated  # zero-shot scores, calibration's thresholds


def test_adapters_survive_the_file_and_refuse_other_centroids(tmp_path):
    data, centroids = poor_prompts_case()
    adapters = fit_on_tuning_half(data, centroids, shots=None, version="adapt-x")
    path = tmp_path / "a.npz"
    write_adapter_file(adapters, path)
    again = adapters_for(path, centroids)
    np.testing.assert_array_equal(score_matrices(data.embeddings, centroids, adapters=again)["score"],
                                  score_matrices(data.embeddings, centroids, adapters=adapters)["score"])
    with pytest.raises(AdapterMismatchError, match="category_adapters"):
        adapters_for(path, dataclasses.replace(centroids, prompt_version="v2"))
    path.write_bytes(b"not an npz")
    with pytest.raises(DamagedFileError, match="select category_adapters"):
        read_adapters(path)


def _labels_csv(collection, path):
    """The generated collection's labels as a labels file (path, labels)."""
    lines = (collection / "labels.csv").read_text().splitlines()
    path.write_text(lines[0] + "\n" + "\n".join(lines[1:]) + "\n")
    return path


def test_adapter_version_lands_in_the_rows_and_old_files_keep_working(settings, classified, collection, tmp_path):
    layout = classified
    with connect(layout.duckdb_path, read_only=True) as con:
        assert {r[0] for r in con.execute("SELECT DISTINCT adapter_version FROM image_classifications").fetchall()} == {
            "none"}
    labels = _labels_csv(collection, tmp_path / "labels.csv")
    summary = write_adapters(layout, labels)
    assert summary.version.startswith("adapt-") and summary.labelled_images == 20
    data = load_labelled_embeddings(layout, read_labels_file(labels), read_centroids(layout.duckdb_path))
    assert summary.heldout_images == int(data.heldout.sum())
    classified_now = write_classifications(layout, "batch-001")
    assert classified_now.adapter_version == summary.version
    with connect(layout.duckdb_path, read_only=True) as con:
        assert con.execute("SELECT DISTINCT batch, adapter_version FROM image_classifications ORDER BY 1").fetchall() == [
            ("batch-001", summary.version), ("batch-002", "none")]
    # no labels: the adapters file goes and classification is zero-shot again
    assert write_adapters(layout, None).version == "none" and not layout.adapters_path.exists()
    # a DuckDB file from before adapters (no adapter_version column) is migrated by the next writer
    with connect(layout.duckdb_path) as con:
        con.execute("ALTER TABLE image_classifications DROP COLUMN adapter_version")
    write_classifications(layout, "batch-002")
    with connect(layout.duckdb_path, read_only=True) as con:
        assert con.execute("SELECT DISTINCT adapter_version FROM image_classifications").fetchall() == [("none",)]


def test_a_capped_sample_keeps_a_rare_category_labelled_images_and_is_stable():
    rng = np.random.default_rng(3)
    n, cap = 50_000, 4096
    truth = np.zeros((n, 3), dtype=bool)
    truth[:, 0] = rng.random(n) < 0.5
    rare = rng.choice(n, size=40, replace=False)
    truth[rare, 2] = True
    ids = [f"img-{i}" for i in range(n)]
    sample = stratified_sample(ids, truth, cap, "fit")
    assert len(sample) == cap and len(np.unique(sample)) == cap
    assert set(rare) <= set(sample.tolist())  # a plain hash sample of 8% would keep about 3 of the 40
    assert np.array_equal(sample, stratified_sample(list(ids), truth.copy(), cap, "fit"))
    assert np.array_equal(stratified_sample(ids[:100], truth[:100], cap, "fit"), np.arange(100))
