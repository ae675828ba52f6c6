"""A person's verdict wins in image_classifications, and says so (`decided_by`), with the real tiny model and DuckDB."""

import pyarrow.parquet as pq

from clip_assets.classification.steps import write_classifications
from clip_assets.storage.warehouse import connect
from clip_assets.tuning.calibration import evaluate_current, load_labelled_scores
from clip_assets.tuning.labels_file import LabelRows
from clip_assets.tuning.review_labels import record_verdict, undo_last

DECISIONS = (
    "SELECT image_id, category, matched, model_matched, decided_by FROM image_classifications WHERE batch = 'batch-001'"
)


def rows(layout, sql, params=()):
    with connect(layout.duckdb_path, read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def decisions(layout):
    return {(i, c): (m, mm, d) for i, c, m, mm, d in rows(layout, DECISIONS)}


def test_a_yes_keeps_an_image_in_and_a_no_keeps_it_out_whatever_the_threshold(classified):
    layout = classified
    path_of = {r["image_id"]: r["path"] for r in pq.read_table(layout.manifest_path("batch-001")).to_pylist()}
    before = decisions(layout)
    assert {d for _, _, d in before.values()} == {"rule"} and all(m == mm for m, mm, _ in before.values())
    # an image the rule puts in a category, and an image (the same) it keeps out of another
    image, kept_in = next((i, c) for (i, c), (m, _, _) in before.items() if m)
    kept_out = next(c for (i, c), (m, _, _) in before.items() if i == image and not m)
    store = layout.review_labels_path
    record_verdict(store, path_of[image], kept_in, "no", "improve")
    record_verdict(store, path_of[image], kept_out, "yes", "estimate")
    other = next(i for i, _ in before if i != image)
    record_verdict(store, path_of[other], kept_in, "skip", "improve")  # a skip decides nothing
    record_verdict(store, "batch-001/gone.jpg", kept_in, "yes", "improve")  # no such image: applied to nothing
    record_verdict(store, path_of[other], "unicorn", "yes", "improve")  # no such category: applied to nothing

    write_classifications(layout, "batch-001")
    after = decisions(layout)
    assert after[(image, kept_in)] == (False, True, "person")
    assert after[(image, kept_out)] == (True, False, "person")
    assert {k: v for k, v in after.items() if k[0] != image or k[1] not in (kept_in, kept_out)} == {
        k: v for k, v in before.items() if k[0] != image or k[1] not in (kept_in, kept_out)
    }
    assert rows(layout, "SELECT count(*) FROM image_classifications WHERE decided_by = 'person'") == [(2,)]
    # the views read the decision a person made
    labels = dict(rows(layout, "SELECT image_id, categories FROM image_labels WHERE batch = 'batch-001'"))
    assert kept_in not in labels[image] and kept_out in labels[image]
    counts = dict(rows(layout, "SELECT category, images_matched FROM category_counts"))
    for category in (kept_in, kept_out):
        assert (
            counts[category]
            == rows(layout, "SELECT count(*) FROM image_classifications WHERE category = ? AND matched", [category])[0][
                0
            ]
        )

    # evaluation scores the model's decisions, not the person's (the person is right by definition),
    # and only on the categories the labels judge
    truth = LabelRows("path", {path_of[image]: {kept_out}}, {path_of[image]: {kept_in, kept_out}})
    scores = {s.category: s for s in evaluate_current(load_labelled_scores(layout, truth))}
    assert (scores[kept_in].false_positives, scores[kept_out].false_negatives) == (1, 1)
    assert sum(s.true_positives + s.false_positives + s.false_negatives for s in scores.values()) == 2

    while undo_last(store) is not None:  # every verdict taken back: the rule decides again
        pass
    write_classifications(layout, "batch-001")
    assert decisions(layout) == before
