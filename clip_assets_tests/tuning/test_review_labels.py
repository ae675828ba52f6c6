"""The review labels store: durable, concurrent, append-only verdicts in a real SQLite file in a temp dir;
its export, import and combination with the labels file (clip_assets.tuning.label_sources)."""

import multiprocessing
import sqlite3
import threading
from concurrent.futures import ProcessPoolExecutor

import pytest

from clip_assets.config.layout import DataLayout
from clip_assets.ingest.manifest import image_id_for
from clip_assets.tuning.label_sources import combined_labels, export_labels, import_labels
from clip_assets.tuning.labels_file import LabelRows, read_labels_file, write_labels_file
from clip_assets.tuning.review_labels import (
    IMPORT,
    NO_REVIEW_LABELS,
    ReviewLabelsError,
    current_verdicts,
    labels_version,
    record_verdict,
    records,
    undo,
    undo_last,
)


def _label_many(store, worker: int, clicks: int, shared: int) -> int:
    """One process's clicks: its own, then retries of request ids every worker sends (a retried POST)."""
    for i in range(clicks):
        record_verdict(
            store,
            f"b/{worker}-{i}.jpg",
            "cat",
            "yes" if i % 2 else "no",
            "estimate",
            request_id=f"w{worker}-{i}",
            reviewer=f"tab{worker}",
        )
    for i in range(shared):
        record_verdict(store, f"b/shared-{i}.jpg", "cat", "yes", "improve", request_id=f"shared-{i}")
    return worker


def test_two_processes_and_four_threads_at_once_lose_nothing_and_duplicate_nothing(tmp_path):
    store = tmp_path / "labels" / "review_labels.sqlite"
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=spawn) as pool:
        processes = [pool.submit(_label_many, store, w, 150, 40) for w in (0, 1)]
        threads = [threading.Thread(target=_label_many, args=(store, w, 50, 40)) for w in (2, 3, 4, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(p.result() for p in processes) == [0, 1]
    stored = records(store)
    assert len(stored) == 2 * 150 + 4 * 50 + 40  # every click once, each shared request id once
    assert len({r.request_id for r in stored}) == len(stored)
    assert len({r.record_id for r in stored}) == len(stored)
    assert len(current_verdicts(store)) == len(stored)
    with sqlite3.connect(store) as con:  # the file is in WAL mode: readers never wait for a writer
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_retried_request_returns_the_first_record_and_a_reused_id_for_another_verdict_is_refused(tmp_path):
    store = tmp_path / "s.sqlite"
    first = record_verdict(
        store, "b/1.jpg", "cat", "yes", "estimate", request_id="click-1", model="m", prompt_version="p"
    )
    again = record_verdict(
        store, "b/1.jpg", "cat", "yes", "estimate", request_id="click-1", model="m", prompt_version="p"
    )
    assert again == first and len(records(store)) == 1
    assert (first.batch, first.model, first.prompt_version, first.queue) == ("b", "m", "p", "estimate")
    with pytest.raises(ReviewLabelsError, match="already used for record"):
        record_verdict(store, "b/1.jpg", "cat", "no", "estimate", request_id="click-1")
    assert len(records(store)) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("b/1.jpg", "cat", "maybe", "estimate"), "verdict is one of"),
        (("b/1.jpg", "cat", "yes", "somewhere"), "queue is one of"),
        (("/etc/passwd", "cat", "yes", "estimate"), "relative to the image root"),
        (("b/../../x.jpg", "cat", "yes", "estimate"), "relative to the image root"),
        (("b/1.jpg", " ", "yes", "estimate"), "needs a category"),
    ],
)
def test_bad_verdicts_are_refused_and_store_nothing(tmp_path, args, message):
    store = tmp_path / "s.sqlite"
    with pytest.raises(ReviewLabelsError, match=message):
        record_verdict(store, *args)
    assert records(store) == []


def test_an_undo_is_a_new_record_and_the_verdict_before_it_counts_again(tmp_path):
    store = tmp_path / "s.sqlite"
    yes = record_verdict(store, "b/1.jpg", "cat", "yes", "estimate", reviewer="ann")
    no = record_verdict(store, "b/1.jpg", "cat", "no", "improve", reviewer="ann")
    other = record_verdict(store, "b/2.jpg", "cat", "yes", "improve", reviewer="bob")
    assert current_verdicts(store)[("b/1.jpg", "cat")].verdict == "no"

    undone = undo_last(store, reviewer="ann")  # ann's last click, not bob's later one
    assert (undone.verdict, undone.undoes, undone.path) == ("undo", no.record_id, "b/1.jpg")
    assert current_verdicts(store)[("b/1.jpg", "cat")] == yes
    assert [r.record_id for r in records(store)] == [yes.record_id, no.record_id, other.record_id, undone.record_id]

    # a second tab undoing the same click stores no second undo; an undo cannot itself be undone
    assert undo(store, no.record_id) == undone
    with pytest.raises(ReviewLabelsError, match="is an undo"):
        undo(store, undone.record_id)
    # a retried undo_last (same request id) does not undo one more
    back = undo_last(store, reviewer="ann", request_id="undo-2")
    assert back.undoes == yes.record_id and undo_last(store, reviewer="ann", request_id="undo-2") == back
    assert ("b/1.jpg", "cat") not in current_verdicts(store)
    assert undo_last(store, reviewer="ann") is None
    assert len(records(store)) == 5  # three verdicts, two undos: nothing deleted


def test_the_version_moves_with_yes_and_no_only(tmp_path):
    store = tmp_path / "s.sqlite"
    assert labels_version(store) == NO_REVIEW_LABELS
    record_verdict(store, "b/1.jpg", "cat", "skip", "estimate")
    assert labels_version(store) == NO_REVIEW_LABELS
    record_verdict(store, "b/1.jpg", "cat", "yes", "estimate")
    one = labels_version(store)
    assert one != NO_REVIEW_LABELS
    record_verdict(store, "b/2.jpg", "cat", "no", "improve")
    two = labels_version(store)
    assert two != one
    undo_last(store)
    assert labels_version(store) == one


def test_export_reads_back_through_the_labels_file_reader_and_imports_to_the_same_verdicts(tmp_path):
    store = tmp_path / "s.sqlite"
    record_verdict(store, "b/1.jpg", "cat", "yes", "estimate")
    record_verdict(store, "b/1.jpg", "dog", "no", "improve")
    record_verdict(store, "b/2.jpg", "dog", "no", "estimate")
    record_verdict(store, "b/3.jpg", "cat", "skip", "estimate")
    for name in ("labels.csv", "labels.parquet"):
        exported = export_labels(store, tmp_path / name)
        rows = read_labels_file(exported)
        assert rows == LabelRows(
            "path", {"b/1.jpg": {"cat"}, "b/2.jpg": set()}, {"b/1.jpg": {"cat", "dog"}, "b/2.jpg": {"dog"}}
        )
        other = tmp_path / f"other-{name}.sqlite"
        summary = import_labels(other, exported)
        assert (summary.rows, summary.added, summary.already_stored) == (2, 3, 0)
        assert {k: r.verdict for k, r in current_verdicts(other).items()} == {
            ("b/1.jpg", "cat"): "yes",
            ("b/1.jpg", "dog"): "no",
            ("b/2.jpg", "dog"): "no",
        }
        assert {r.queue for r in records(other)} == {IMPORT}
        assert import_labels(other, exported).added == 0  # the same file again stores nothing new


def test_a_file_of_whole_image_labels_imports_with_the_categories_it_was_judged_on(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,labels\nb/1.jpg,cat\nb/2.jpg,none\n")
    store = tmp_path / "s.sqlite"
    with pytest.raises(ReviewLabelsError, match="pass the categories"):
        import_labels(store, labels)
    import_labels(store, labels, categories=["cat", "dog"])
    assert {k: r.verdict for k, r in current_verdicts(store).items()} == {
        ("b/1.jpg", "cat"): "yes",
        ("b/1.jpg", "dog"): "no",
        ("b/2.jpg", "cat"): "no",
        ("b/2.jpg", "dog"): "no",
    }


def test_a_damaged_store_is_named_and_nothing_is_written_to_it(tmp_path):
    store = tmp_path / "s.sqlite"
    store.write_bytes(b"not a database at all " * 200)
    before = store.read_bytes()
    for attempt in (
        lambda: current_verdicts(store),
        lambda: labels_version(store),
        lambda: record_verdict(store, "b/1.jpg", "cat", "yes", "estimate"),
    ):
        with pytest.raises(ReviewLabelsError, match=f"{store} is not a readable labels store"):
            attempt()
    assert store.read_bytes() == before


def test_the_store_and_the_labels_file_combine_and_the_store_wins(tmp_path):
    layout = DataLayout(tmp_path / "data")
    labels = write_labels_file(LabelRows("path", {"b/1.jpg": {"cat"}, "b/2.jpg": set()}), tmp_path / "labels.csv")
    store = layout.review_labels_path
    assert combined_labels(None, store) is None
    assert combined_labels(labels, store) == read_labels_file(labels)
    record_verdict(store, "b/1.jpg", "cat", "no", "improve")  # the file says cat: the person now says not
    record_verdict(store, "b/2.jpg", "dog", "yes", "improve")
    record_verdict(store, "b/3.jpg", "dog", "yes", "estimate")  # only in the store: judged on dog alone
    both = combined_labels(labels, store)
    assert both.labels == {"b/1.jpg": set(), "b/2.jpg": {"dog"}, "b/3.jpg": {"dog"}}
    assert both.judged == {"b/3.jpg": {"dog"}}  # the file's images stay judged on every category
    assert both.is_judged("b/1.jpg", "bird") and not both.is_judged("b/3.jpg", "cat")
    assert combined_labels(None, store).judged == {"b/1.jpg": {"cat"}, "b/2.jpg": {"dog"}, "b/3.jpg": {"dog"}}


def test_a_labels_file_by_image_id_meets_the_stores_verdicts_on_the_same_images(tmp_path):
    store = tmp_path / "s.sqlite"
    by_id = LabelRows("image_id", {image_id_for("b/1.jpg"): {"cat"}})
    labels = write_labels_file(by_id, tmp_path / "labels.parquet")
    record_verdict(store, "b/1.jpg", "cat", "no", "improve")  # the same image: the store wins
    record_verdict(store, "b/2.jpg", "dog", "yes", "estimate")
    both = combined_labels(labels, store)
    assert both.key == "image_id"
    assert both.labels == {image_id_for("b/1.jpg"): set(), image_id_for("b/2.jpg"): {"dog"}}
    assert both.judged == {image_id_for("b/2.jpg"): {"dog"}}
