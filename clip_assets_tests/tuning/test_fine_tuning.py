"""Contrastive fine-tuning: a broken captions file is refused where it is broken, tuning lowers the
held-out loss, the checkpoint loads as a new model, and LiT leaves the image tower as it was."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import random
from pathlib import Path

import pytest
import torch

from clip_assets.classification.prompts import load_categories
from clip_assets.cli import main
from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import REPO_ROOT
from clip_assets.demo.second_domain import (
    REPLAY_FOLDER,
    heldout_truth,
    write_domain_collection,
    write_replay_captions,
    zero_shot_scores,
)
from clip_assets.demo.shapes import LABELS_FILE, make_sample
from clip_assets.model.clip_model import load_clip_model, model_identity
from clip_assets.model.fine_tuned_weights import NoFineTunedModelError, configured_weights
from clip_assets.storage.atomic_files import write_named_by_content
from clip_assets.storage.damaged_files import DamagedFileError
from clip_assets.tuning.fine_tuning import (
    WISE_ALPHAS,
    CaptionsFileError,
    FineTuneOptions,
    fine_tune_to_checkpoint,
    read_captions_file,
    split_pairs,
    validation_split,
)
from clip_assets.tuning.steps import write_fine_tuned_model
from clip_assets_tests.support.damage import DAMAGES, damage
from clip_assets_tests.support.s3_server import upload

TINY = "clip-assets-tiny"


def write_captions(path: Path, rows: list[list[str]], header=("path", "caption")) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> tuple[Path, Path]:
    """64 generated shape images, each with a colour caption and a shape-and-colour caption."""
    root = tmp_path_factory.mktemp("captioned")
    rng = random.Random(3)
    rows = []
    (root / "pairs").mkdir()
    for i in range(64):
        sample = make_sample(rng, (64, 64))
        path = f"pairs/img-{i:03d}.png"
        sample.image.save(root / path)
        rows.append([path, " and ".join(f"something {s.colour}" for s in sample.shapes)])
        rows.append([path, sample.caption()])
    return root, write_captions(root / "captions.csv", rows)


@pytest.mark.parametrize(
    "header, rows, where",
    [
        (("path", "text"), [["a.png", "a red circle"]], "line 1: no 'caption' column"),
        (("path", "caption"), [["a.png", "a red circle"], ["b.png", "  "]], "line 3, field 'caption': empty"),
        (("path", "caption"), [["", "a red circle"]], "line 2, field 'path': empty"),
        (("path", "caption"), [["a.png", "ok"], ["a.png", "ok"], ["../secret.png", "x"]], "line 4, field 'path'"),
        (("path", "caption"), [["a.png", "a red", "circle"]], "line 2: more fields than the header's 2"),
    ],
)
def test_a_broken_captions_file_is_refused_naming_file_line_and_field(tmp_path, header, rows, where):
    path = write_captions(tmp_path / "captions.csv", rows, header)
    with pytest.raises(CaptionsFileError) as refused:
        read_captions_file(path)
    assert str(path) in str(refused.value) and where in str(refused.value)


def test_a_captions_file_that_is_not_text_names_its_line(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_bytes(b"path,caption\na.png,a red circle\nb.png,\xff\xfe\n")
    with pytest.raises(CaptionsFileError, match=r"captions.csv, line 3: not UTF-8"):
        read_captions_file(path)


def test_an_image_that_cannot_be_read_names_its_captions_line(tmp_path, captioned, checkpoint):
    root, captions = captioned
    rows = list(csv.reader(open(captions)))[1:]
    broken = write_captions(tmp_path / "captions.csv", rows[:40] + [["pairs/missing.png", "a red circle"]] + rows[40:])
    with pytest.raises(CaptionsFileError, match=r"line 42, field 'path': cannot read image .*missing.png"):
        fine_tune_to_checkpoint(TINY, str(checkpoint), broken, root, tmp_path / "data",
                                FineTuneOptions(epochs=1, heldout_fraction=0.5), "cpu", log=lambda _: None)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.pt"))


def test_fine_tuning_reads_its_images_from_a_bucket_as_from_a_folder(tmp_path, captioned, checkpoint, s3_store):
    root, captions = captioned
    bucket = upload(root, s3_store, "captioned")
    options = FineTuneOptions(epochs=1, batch_size=16, wise_alpha=1)
    local = fine_tune_to_checkpoint(TINY, str(checkpoint), captions, root, tmp_path / "local", options, "cpu",
                                    log=lambda _: None)
    remote = fine_tune_to_checkpoint(TINY, str(checkpoint), captions, bucket, tmp_path / "remote", options, "cpu",
                                     log=lambda _: None)
    assert remote.before.loss == pytest.approx(local.before.loss) and remote.after.loss == pytest.approx(local.after.loss)
    rows = list(csv.reader(open(captions)))[1:]
    broken = write_captions(tmp_path / "captions.csv", rows[:3] + [["pairs/missing.png", "a red circle"]] + rows[3:])
    with pytest.raises(CaptionsFileError, match=r"line 5, field 'path': cannot read image s3://.*missing.png"):
        fine_tune_to_checkpoint(TINY, str(checkpoint), broken, bucket, tmp_path / "broken", options, "cpu",
                                log=lambda _: None)


def test_the_split_keeps_an_images_captions_together_and_does_not_depend_on_the_other_rows(captioned):
    pairs = read_captions_file(captioned[1])
    training, heldout = split_pairs(pairs, 0.25)
    assert {p.path for p in training}.isdisjoint({p.path for p in heldout}) and training and heldout
    again_training, again_heldout = split_pairs(pairs[::-1][:50], 0.25)
    assert {p.path for p in again_heldout} <= {p.path for p in heldout}
    assert {p.path for p in again_training} <= {p.path for p in training}


def test_fine_tuning_lowers_the_heldout_loss_and_writes_a_new_model(tmp_path, captioned, checkpoint):
    root, captions = captioned
    report = fine_tune_to_checkpoint(TINY, str(checkpoint), captions, root, tmp_path / "data",
                                     FineTuneOptions(epochs=6, lr=2e-3, batch_size=16, wise_alpha=1), "cpu",
                                     log=lambda _: None)
    assert report.after.loss < report.before.loss, report.table()
    assert report.checkpoint.parent == tmp_path / "data" / "fine_tuned_models"
    tuned = load_clip_model(TINY, str(report.checkpoint), "cpu")
    assert tuned.identity != model_identity(TINY, str(checkpoint)) == report.base_identity
    assert hashlib.sha256(report.checkpoint.read_bytes()).hexdigest()[:12] in report.checkpoint.name
    # What loads is the tuned model, not the base one.
    base = load_clip_model(TINY, str(checkpoint), "cpu")
    caption = ["something red"]
    assert not torch.allclose(tuned.encode_texts(caption), base.encode_texts(caption))


def test_wise_ft_writes_the_weights_between_the_base_and_the_tuned_ones(tmp_path, captioned, checkpoint):
    root, captions = captioned
    options = FineTuneOptions(epochs=1, lr=2e-3, batch_size=16, wise_alpha=1)
    tuned = fine_tune_to_checkpoint(TINY, str(checkpoint), captions, root, tmp_path / "tuned", options, "cpu",
                                    log=lambda _: None)
    halfway = fine_tune_to_checkpoint(TINY, str(checkpoint), captions, root, tmp_path / "halfway",
                                      dataclasses.replace(options, wise_alpha=0.25), "cpu", log=lambda _: None)
    base = torch.load(checkpoint, weights_only=True)["state_dict"]
    tuned_state = torch.load(tuned.checkpoint, weights_only=True)["state_dict"]
    halfway_state = torch.load(halfway.checkpoint, weights_only=True)["state_dict"]
    moved = [k for k, v in tuned_state.items() if v.is_floating_point() and not torch.equal(v, base[k])]
    assert moved and halfway.checkpoint.name != tuned.checkpoint.name
    for key in moved:
        assert torch.allclose(halfway_state[key], 0.75 * base[key] + 0.25 * tuned_state[key], atol=1e-5), key
    assert "0.25 tuned + 0.75 base (WiSE-FT)" in halfway.table()
    with pytest.raises(ValueError, match="wise_alpha 0"):
        FineTuneOptions(wise_alpha=0)


def test_by_default_the_wise_ft_share_is_chosen_on_a_validation_split_apart_from_the_heldout_one(tmp_path, captioned,
                                                                                                 checkpoint):
    root, captions = captioned
    report = fine_tune_to_checkpoint(TINY, str(checkpoint), captions, root, tmp_path / "data",
                                     FineTuneOptions(epochs=2, lr=2e-3, batch_size=16), "cpu", log=lambda _: None)
    pairs = read_captions_file(captions)
    training, heldout = split_pairs(pairs)
    trained, validation = validation_split(training)
    assert validation and trained and not {p.path for p in validation} & {p.path for p in trained}
    assert report.training_pairs == len(trained) and report.heldout_pairs == len(heldout)
    assert report.wise.validation_images == len({p.path for p in validation})
    # the rule, checked against the figures it reports: the best validation accuracy, then the lower loss
    assert sorted(a for a, _, _ in report.wise.validation) == sorted(WISE_ALPHAS)
    assert report.wise.alpha == max(report.wise.validation, key=lambda s: (s[1], -s[2]))[0]
    assert torch.load(report.checkpoint, weights_only=True)["fine_tuning"]["wise_alpha"] == report.wise.alpha
    assert f"chosen on {report.wise.validation_images} validation images" in report.table()


def test_opted_in_before_any_fine_tuned_model_the_search_says_what_to_build(settings, tmp_path):
    settings = settings.model_copy(update={"fine_tune_captions": tmp_path / "captions.csv", "use_fine_tuned": True})
    with pytest.raises(NoFineTunedModelError, match="materialize fine_tuned_model first"):
        configured_weights(settings)
    assert configured_weights(settings.model_copy(update={"use_fine_tuned": False})) == settings.pretrained


def _tower(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def test_lit_tunes_the_text_side_and_leaves_the_image_tower_unchanged(tmp_path, captioned, checkpoint):
    root, captions = captioned
    report = fine_tune_to_checkpoint(TINY, str(checkpoint), captions, root, tmp_path / "data",
                                     FineTuneOptions(lock_image=True, epochs=2, batch_size=16), "cpu",
                                     log=lambda _: None)
    before = torch.load(checkpoint, weights_only=True)["state_dict"]
    after = torch.load(report.checkpoint, weights_only=True)["state_dict"]
    assert set(before) == set(after)
    visual_before, visual_after = _tower(before, "visual."), _tower(after, "visual.")
    assert visual_before and all(torch.equal(visual_before[k], visual_after[k]) for k in visual_before)
    text_keys = [k for k in before if not k.startswith("visual.") and before[k].is_floating_point()]
    assert any(not torch.equal(before[k], after[k]) for k in text_keys)


def test_the_fine_tune_command_prints_before_after_and_how_to_opt_in(settings, cli_env, captioned, capsys):
    root, captions = captioned
    cli_env(settings)
    assert main(["fine-tune", "--captions", str(captions), "--image-root", str(root), "--epochs", "1",
                 "--lock-image", "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    written = list((settings.data_dir / "fine_tuned_models").glob("*.pt"))
    assert len(written) == 1
    assert "contrastive loss" in out and "image->text retrieval" in out
    assert f"CLIP_ASSETS_PRETRAINED={written[0]}" in out


def test_the_fine_tune_command_refuses_a_broken_file_in_one_line(settings, cli_env, tmp_path, capsys):
    cli_env(settings)
    broken = write_captions(tmp_path / "broken.csv", [["a.png", ""]])
    assert main(["fine-tune", "--captions", str(broken)]) == 1
    out, err = capsys.readouterr()
    assert err.strip().count("\n") == 0 and "line 2, field 'caption': empty" in err and "Traceback" not in err


def test_a_checkpoint_write_that_fails_leaves_no_file(tmp_path):
    def half_written(tmp: Path) -> None:
        tmp.write_bytes(b"half a checkpoint")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="(?i)no space left"):  # DiskFullError says which file and what to do
        write_named_by_content(tmp_path / "models", lambda digest: f"tiny-fine-tuned-{digest}.pt", half_written)
    assert list((tmp_path / "models").iterdir()) == []


def test_the_second_domain_is_scored_on_the_images_fine_tuning_held_out(tmp_path, clip):
    root = tmp_path / "hatched"
    captions = write_domain_collection(root, "hatched", images=24, seed=5)
    truth = heldout_truth(root / LABELS_FILE, 0.25)
    training, heldout = split_pairs(read_captions_file(captions), 0.25)
    assert truth and set(truth) == {p.path for p in heldout}
    assert set(truth).isdisjoint({p.path for p in training})
    scores = zero_shot_scores(clip, REPO_ROOT / "prompts", root, truth)
    assert [s.category for s in scores] == [c.name for c in load_categories(REPO_ROOT / "prompts")]
    for s in scores:  # every held-out image that shows a category is counted as found or missed
        assert s.true_positives + s.false_negatives == sum(s.category in labels for labels in truth.values())


def test_replay_adds_filled_shape_pairs_and_keeps_the_domains_held_out_images_held_out(tmp_path):
    root = tmp_path / "hatched"
    domain = read_captions_file(write_domain_collection(root, "hatched", images=24, seed=5))
    mixed = read_captions_file(write_replay_captions(root, 10))
    replayed = [p for p in mixed if p.path.startswith(f"{REPLAY_FOLDER}/")]
    assert [(p.path, p.caption) for p in mixed[:len(domain)]] == [(p.path, p.caption) for p in domain]
    assert len(replayed) == len(mixed) - len(domain) == 10 * 3
    assert len({p.path for p in replayed}) == 10 and all((root / p.path).is_file() for p in replayed)
    # The domain's held-out images stay held out, whatever is mixed in (the split hashes each path).
    _, heldout = split_pairs(domain, 0.25)
    _, heldout_mixed = split_pairs(mixed, 0.25)
    assert {p.path for p in heldout} == {p.path for p in heldout_mixed if not p.path.startswith(f"{REPLAY_FOLDER}/")}


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_fine_tuned_checkpoint_or_record_is_named_and_rebuilt_by_fine_tuned_model(
    how, settings, captioned, checkpoint
):
    root, captions = captioned
    layout = DataLayout(settings.data_dir)
    options = FineTuneOptions(epochs=1, batch_size=16, wise_alpha=1)
    report = write_fine_tuned_model(TINY, str(checkpoint), captions, root, layout, options, "cpu", log=lambda _: None)
    opted_in = settings.model_copy(update={"fine_tune_captions": captions, "use_fine_tuned": True})
    assert configured_weights(opted_in) == str(report.checkpoint)

    damage(report.checkpoint, how)  # its bytes no longer hash to its name: found before torch reads it
    for load in (lambda: configured_weights(opted_in), lambda: load_clip_model(TINY, str(report.checkpoint), "cpu")):
        with pytest.raises(DamagedFileError) as caught:
            load()
        assert str(report.checkpoint) in str(caught.value)
        assert "dagster asset materialize -m clip_assets.definitions --select fine_tuned_model" in str(caught.value)
    record = layout.fine_tuned_model_in_use_path
    damage(record, how)
    with pytest.raises(DamagedFileError) as caught:
        configured_weights(opted_in)
    assert str(record) in str(caught.value) and "--select fine_tuned_model" in str(caught.value)

    again = write_fine_tuned_model(TINY, str(checkpoint), captions, root, layout, options, "cpu", log=lambda _: None)
    tuned = load_clip_model(TINY, configured_weights(opted_in), "cpu")
    assert configured_weights(opted_in) == str(again.checkpoint) and tuned.identity == model_identity(
        TINY, str(again.checkpoint)
    )
