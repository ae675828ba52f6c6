"""The review queues and the precision estimate, on classification rows written into a real DuckDB file."""

import numpy as np
import pyarrow as pa
import pytest

from clip_assets.config.layout import DataLayout
from clip_assets.ingest.manifest import image_id_for
from clip_assets.storage.atomic_files import write_parquet_atomically
from clip_assets.storage.warehouse import connect
from clip_assets.tuning.precision_estimate import (
    estimate_from_counts,
    estimate_precision,
    recall_interval,
    wilson_interval,
)
from clip_assets.tuning.review_labels import record_verdict, undo_last
from clip_assets.tuning.review_queues import estimate_queue, improve_queue

IMAGES = 200


def paths_in_order() -> list[str]:
    return [f"b/{i:03d}.jpg" for i in range(IMAGES)]


def scored_collection(tmp_path, disagree: tuple[int, ...] = ()) -> DataLayout:
    """One multi_label category, 'cat', threshold 0: image i scores (i - 100) / 100, so the 100 images
    from 100 up are matched; no neutral condition. `disagree`: images the zero-shot rule decided the
    other way (as if an adapter had changed their decision)."""
    layout = DataLayout(tmp_path / "data")
    paths = paths_in_order()
    ids = [image_id_for(p) for p in paths]  # as the manifest names them
    score = (np.arange(IMAGES) - 100) / 100
    matched = score >= 0
    rule = matched.copy()
    rule[list(disagree)] = ~rule[list(disagree)]
    with connect(layout.duckdb_path) as con:
        con.execute(
            "INSERT INTO prompt_categories VALUES ('cat', 0, 'f.toml', 'multi_label', 0.0, 0.0, 1, 100.0, 'm', 'v')"
        )
        con.register(
            "rows",
            pa.table(
                {
                    "batch": ["b"] * IMAGES,
                    "image_id": ids,
                    "category": ["cat"] * IMAGES,
                    "mode": ["multi_label"] * IMAGES,
                    "pos_sim": pa.array(score + 0.3, pa.float32()),
                    "neg_sim": pa.array(np.full(IMAGES, 0.3), pa.float32()),
                    "score": pa.array(score, pa.float32()),
                    "threshold": np.zeros(IMAGES),
                    "neutral_margin": np.zeros(IMAGES),
                    "matched": matched,
                    "model": ["m"] * IMAGES,
                    "prompt_version": ["v"] * IMAGES,
                    "adapter_version": ["a"] * IMAGES,
                    "model_matched": matched,
                    "rule_matched": rule,
                    "decided_by": ["adapter"] * IMAGES,
                }
            ),
        )
        con.execute("INSERT INTO image_classifications BY NAME SELECT * FROM rows")
    write_parquet_atomically(pa.table({"image_id": ids, "path": paths}), layout.manifest_path("b"))
    return layout


def test_the_estimate_queue_alternates_uniform_samples_of_matches_and_non_matches_in_a_stable_order(tmp_path):
    layout = scored_collection(tmp_path)
    queue = estimate_queue(layout, "cat", limit=IMAGES)
    assert queue == estimate_queue(layout, "cat", limit=IMAGES)  # another request, another tab: the same order
    assert [q.model_matched for q in queue] == [True, False] * (IMAGES // 2)
    assert sorted(q.path for q in queue) == paths_in_order()
    assert all(q.image_id == image_id_for(q.path) for q in queue)
    assert estimate_queue(layout, "cat", limit=10, seed=1) != queue[:10]
    # uniform: over many seeds, the first ten matches are as far from the threshold as matches are on
    # average (0.495), not near it as the improve queue's are
    first = [
        q.score for seed in range(60) for q in estimate_queue(layout, "cat", limit=20, seed=seed) if q.model_matched
    ]
    assert np.mean(first) == pytest.approx(0.495, abs=0.04)
    assert np.mean([q.score for q in improve_queue(layout, "cat", limit=20)]) < 0.1


def test_labelled_images_leave_the_queues_they_were_labelled_for(tmp_path):
    layout = scored_collection(tmp_path)
    store = layout.review_labels_path
    first, second = estimate_queue(layout, "cat", limit=2)
    record_verdict(store, first.path, "cat", "yes", "estimate")
    record_verdict(store, second.path, "cat", "skip", "estimate")
    nearest = improve_queue(layout, "cat", limit=1)[0]
    record_verdict(store, nearest.path, "cat", "no", "improve")
    after = estimate_queue(layout, "cat", limit=IMAGES)
    assert {first.path, second.path}.isdisjoint(q.path for q in after) and len(after) == IMAGES - 2
    assert nearest.path in {q.path for q in after}  # an improve label keeps the random sample whole
    assert nearest.path not in {q.path for q in improve_queue(layout, "cat", limit=IMAGES)}
    assert first.path not in {q.path for q in improve_queue(layout, "cat", limit=IMAGES)}
    undo_last(store)
    assert nearest.path == improve_queue(layout, "cat", limit=1)[0].path  # undone: back in the queue


def test_the_improve_queue_asks_first_where_rule_and_adapter_disagree_then_nearest_the_threshold(tmp_path):
    layout = scored_collection(tmp_path, disagree=(10,))
    queue = improve_queue(layout, "cat", limit=5)
    assert queue[0].path == "b/010.jpg" and queue[0].rule_matched != queue[0].model_matched
    assert queue[1].path == "b/100.jpg"  # |score| 0, then .01 (99 and 101), then .02 (98 and 102)
    assert {q.path for q in queue[2:4]} == {"b/099.jpg", "b/101.jpg"} and queue[4].path in {"b/098.jpg", "b/102.jpg"}
    assert [round(abs(q.margin), 6) for q in queue[1:]] == [0.0, 0.01, 0.01, 0.02]


def test_wilson_interval_as_computed_by_hand():
    # 8 of 10, z = 1.959964: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.992073 / 1.384146 = 0.716740,
    # half-width z / (1 + z^2/10) * sqrt(0.8 * 0.2 / 10 + z^2 / 400) = 1.416010 * 0.160011 = 0.226578
    assert wilson_interval(8, 10) == pytest.approx((0.490162, 0.943318), abs=1e-6)
    assert wilson_interval(0, 5) == pytest.approx((0.0, 0.434482), abs=1e-6)  # never below 0, unlike Wald's
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # recall from 8 of 10 matches and 1 of 10 non-matches, 100 matches and 300 non-matches:
    # point 100*0.8 / (100*0.8 + 300*0.1) = 0.727273; each side at sqrt(0.95)
    estimate = estimate_from_counts("cat", 100, 300, 8, 10, 1, 10)
    assert estimate.recall == pytest.approx(80 / 110)
    p_lo, p_hi = wilson_interval(8, 10, 0.95**0.5)
    q_lo, q_hi = wilson_interval(1, 10, 0.95**0.5)
    assert (estimate.recall_low, estimate.recall_high) == pytest.approx(
        (100 * p_lo / (100 * p_lo + 300 * q_hi), 100 * p_hi / (100 * p_hi + 300 * q_lo))
    )
    # about three times the labels so far halve an interval
    assert 25 <= estimate.more_labels_to_halve_precision <= 40
    halved = wilson_interval(
        0.8 * (10 + estimate.more_labels_to_halve_precision), 10 + estimate.more_labels_to_halve_precision
    )
    assert halved[1] - halved[0] <= (0.943318 - 0.490162) / 2


def test_the_intervals_cover_the_true_precision_and_recall_in_200_simulated_review_sessions():
    rng = np.random.default_rng(21)
    covered_precision = covered_recall = 0
    for _ in range(200):
        # a category of 400 matches (80% right) and 3,000 non-matches (4% missed ones)
        matches, non_matches = rng.random(400) < 0.8, rng.random(3000) < 0.04
        true_precision = matches.mean()
        true_recall = matches.sum() / (matches.sum() + non_matches.sum())
        seen_m = rng.choice(matches, 40, replace=False)  # a session: 40 labels of each side
        seen_n = rng.choice(non_matches, 40, replace=False)
        e = estimate_from_counts("c", 400, 3000, int(seen_m.sum()), 40, int(seen_n.sum()), 40)
        covered_precision += e.precision_low <= true_precision <= e.precision_high
        covered_recall += e.recall_low <= true_recall <= e.recall_high
    assert covered_precision >= 180 and covered_recall >= 180


def test_the_estimate_uses_the_estimate_queues_labels_only(tmp_path):
    layout = scored_collection(tmp_path)
    store = layout.review_labels_path
    before = estimate_precision(layout)[0]
    assert (before.matches, before.non_matches, before.labelled_matches, before.precision) == (100, 100, 0, None)
    for q in improve_queue(layout, "cat", limit=20):  # the uncertain ones: all said wrong
        record_verdict(store, q.path, "cat", "no" if q.model_matched else "yes", "improve")
    record_verdict(store, "b/nowhere.jpg", "cat", "yes", "estimate")  # an image no longer classified: left out
    assert estimate_precision(layout)[0] == before
    first = estimate_queue(layout, "cat", limit=40)
    right = {q.path: q.score >= 0.2 or not q.model_matched for q in first}  # matches below 0.2 are wrong
    for q in first:
        record_verdict(store, q.path, "cat", "yes" if right[q.path] == q.model_matched else "no", "estimate")
    record_verdict(store, estimate_queue(layout, "cat", limit=1)[0].path, "cat", "skip", "estimate")  # no label
    after = estimate_precision(layout)[0]
    assert (after.labelled_matches, after.labelled_non_matches) == (20, 20)
    assert after.yes_matches == sum(right[q.path] for q in first if q.model_matched)
    assert after.precision == after.yes_matches / 20 and after.precision_low <= after.precision <= after.precision_high
    assert after.yes_non_matches == 0 and after.recall == 1.0
    with connect(layout.duckdb_path, read_only=True) as con:  # the estimate does not move the decisions
        assert con.execute("SELECT count(*) FROM image_classifications WHERE matched").fetchone() == (100,)
    assert recall_interval(100, 100, 20, 20, 0, 20)[1] == 1.0
