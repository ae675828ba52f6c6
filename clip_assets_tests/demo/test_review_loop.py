"""The demo's review loop on the small generated collection: a scripted person clicks through the
app's endpoints (a real uvicorn server), the real Dagster instance re-materializes from the labels
store, and the table is printed."""

from clip_assets.config.layout import DataLayout
from clip_assets.definitions import build_definitions
from clip_assets.demo.review_loop import decisions, review_loop, set_aside_previous_store
from clip_assets.demo.shapes import LABELS_FILE, read_labels
from clip_assets.instance.execution import materialize_everything
from clip_assets.storage.warehouse import connect
from clip_assets.tuning.review_labels import ESTIMATE, IMPROVE, record_verdict, records

BATCHES = ["batch-001", "batch-002"]


def test_a_scripted_person_labels_through_the_app_and_the_pipeline_takes_the_labels(settings, instance):
    truth = read_labels(settings.image_root / LABELS_FILE)
    layout = DataLayout(settings.data_dir)
    defs = build_definitions(settings)
    materialize_everything(defs, instance, BATCHES)
    with connect(layout.duckdb_path, read_only=True) as con:
        categories = [r[0] for r in con.execute("SELECT category FROM prompt_categories ORDER BY position").fetchall()]
    printed = []
    figures = review_loop(
        settings, defs, instance, BATCHES, truth, categories[:3], printed.append, improve_clicks=4, estimate_clicks=3
    )
    stored = records(layout.review_labels_path)
    assert len(stored) == figures["clicks"] == 3 * (4 + 3)
    for category in categories[:3]:
        mine = [r for r in stored if r.category == category]
        assert [r.queue for r in mine].count(IMPROVE) == 4 and [r.queue for r in mine].count(ESTIMATE) == 3
    for r in stored:  # every answer is the ground truth's
        assert r.verdict == ("yes" if r.category in truth[r.path] else "no")
    tags = decisions(layout, person_included=True)
    for r in stored:  # the improve clicks came before the re-materialization: a person's verdict wins
        if r.queue == IMPROVE:
            assert (r.category in tags[r.path]) == (r.verdict == "yes"), (r.path, r.category)
    for category in categories[:3]:
        e = figures["estimates"][category]
        assert e["labelled_matches"] + e["labelled_non_matches"] == 3
    table = "\n".join(printed)
    assert "F1 before" in table and "estimated precision [95%]" in table and "true precision" in table
    assert all(category in table for category in categories[:3])


def test_an_earlier_demos_labels_are_kept_beside_and_the_next_run_starts_afresh(settings):
    layout = DataLayout(settings.data_dir)
    assert set_aside_previous_store(layout) is None
    record_verdict(layout.review_labels_path, "batch-001/img-0000.png", "circle", "yes", IMPROVE)
    kept = set_aside_previous_store(layout)
    assert kept is not None and not layout.review_labels_path.exists()
    assert [r.verdict for r in records(kept)] == ["yes"]
