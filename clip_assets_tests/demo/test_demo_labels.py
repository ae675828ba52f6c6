"""The demo's labels: a sample of its ground truth, named by demo.env, so its evaluation group runs after the demo."""

from clip_assets.config.settings import Settings
from clip_assets.demo.run import demo_settings, write_env_file, write_labelled_sample
from clip_assets.demo.shapes import LABELS_FILE, read_labels
from clip_assets.tuning.labels_file import read_labels_file


def test_demo_env_names_a_labelled_sample_of_the_ground_truth(tmp_path, collection, checkpoint, monkeypatch):
    truth = read_labels(collection / LABELS_FILE)
    sample = write_labelled_sample(collection / LABELS_FILE, tmp_path / "labelled_sample.csv", share=0.5)
    labels = read_labels_file(sample).labels
    assert 0 < len(labels) < len(truth)
    assert all(labels[path] == truth[path] for path in labels)
    assert write_labelled_sample(collection / LABELS_FILE, tmp_path / "again.csv", share=0.5).read_text() == sample.read_text()

    settings = demo_settings(tmp_path, checkpoint, "cpu", sample)
    write_env_file(tmp_path / "demo.env", settings)
    env = dict(line.split("=", 1) for line in (tmp_path / "demo.env").read_text().splitlines())
    assert env["CLIP_ASSETS_LABELS"] == str(sample)
    for name, value in env.items():  # what `set -a; . .demo/demo.env` gives `dagster dev`
        monkeypatch.setenv(name, value)
    assert Settings.from_env().labels_path == sample
    write_env_file(tmp_path / "bare.env", demo_settings(tmp_path, checkpoint))  # the second domain's: no labels
    assert "CLIP_ASSETS_LABELS" not in (tmp_path / "bare.env").read_text()
