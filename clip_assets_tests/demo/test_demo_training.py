"""The demo's training captions and loss: which captions count as true of which images, and the
multi-positive loss that uses that (no training run here: the demo itself shows what it reaches)."""

from __future__ import annotations

import random

import open_clip
import pytest
import torch
from PIL import Image

from clip_assets.demo.captions import Caption, training_caption
from clip_assets.demo.shapes import Sample, ShapeSpec, background_tint, make_sample
from clip_assets.demo.train import multi_positive_clip_loss, time_left, train_tiny_clip, training_recipe

BLANK = Image.new("RGB", (8, 8))


def sample(*shapes: tuple[str, str], background: str = "plain", tint: str | None = None) -> Sample:
    return Sample(BLANK, tuple(ShapeSpec(kind, colour) for colour, kind in shapes), background, tint)


RED_SQUARE_BLUE_CIRCLE = sample(("red", "square"), ("blue", "circle"))


@pytest.mark.parametrize(
    ("objects", "background", "true"),
    [
        (((None, "square"),), None, True),  # names one of the two shapes
        ((("red", "square"),), "plain", True),
        ((("blue", "square"),), None, False),  # colour and kind of different shapes
        ((("red", None), (None, "circle")), None, True),
        (((None, "square"), (None, "square")), None, False),  # one square cannot be claimed twice
        (((None, "square"), (None, "circle"), (None, "star")), None, False),  # more shapes than the image has
        (((None, "circle"),), "stripes", False),
    ],
)
def test_a_caption_is_true_of_an_image_when_each_claimed_shape_is_a_different_shape_of_it(objects, background, true):
    assert Caption("text", objects, background).is_true_of(RED_SQUARE_BLUE_CIRCLE) is true


def test_a_caption_naming_a_background_tint_is_true_only_of_images_with_that_tint():
    on_yellow = Caption("a circle on a yellow background", ((None, "circle"),), None, "yellow")
    assert on_yellow.is_true_of(sample(("blue", "circle"), tint="yellow"))
    assert not on_yellow.is_true_of(sample(("blue", "circle"), tint="blue"))
    assert not on_yellow.is_true_of(sample(("yellow", "circle")))  # a yellow shape is not a yellow background


@pytest.mark.parametrize(("rgb", "tint"), [((240, 230, 160), "yellow"), ((170, 185, 235), "blue"), ((200, 200, 205), None)])
def test_a_background_is_called_by_its_tint_only_when_clearly_tinted(rgb, tint):
    assert background_tint(Image.new("RGB", (20, 20), rgb)) == tint


def test_captions_name_background_tints_only_when_asked():
    rng = random.Random(2)
    samples = [make_sample(rng) for _ in range(300)]
    assert {s.background_tint for s in samples} >= {None, "yellow"}
    with_tints = [training_caption(s, rng, tints=True) for s in samples]
    assert all(c.is_true_of(s) for c, s in zip(with_tints, samples))
    assert any(c.background_tint == "yellow" and "yellow background" in c.text for c in with_tints)
    assert not any(training_caption(s, rng, tints=False).background_tint for s in samples)


def test_training_captions_are_true_of_their_own_image_and_some_name_one_of_two_shapes():
    rng = random.Random(0)
    samples = [make_sample(rng) for _ in range(200)]
    captions = [training_caption(s, rng, partial=0.5) for s in samples]
    assert all(c.is_true_of(s) for c, s in zip(captions, samples))
    two_shapes = [(c, s) for c, s in zip(captions, samples) if len(s.shapes) == 2]
    assert any(len(c.objects) == 1 for c, _ in two_shapes) and any(len(c.objects) == 2 for c, _ in two_shapes)
    assert all(len(c.objects) == 2 for c in (training_caption(s, rng, partial=0.0) for _, s in two_shapes))


def test_the_loss_is_clip_loss_when_only_the_drawn_caption_is_true():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    expected = open_clip.ClipLoss()(images, texts, scale)
    assert multi_positive_clip_loss(images, texts, scale, torch.eye(6, dtype=torch.bool)) == pytest.approx(expected.item(), rel=1e-5)


def test_the_loss_does_not_push_an_image_away_from_another_images_caption_that_is_true_of_it_too():
    # Images 0 and 1 are alike red squares, drawn with captions "a square" and "a red square"; each
    # image is equally close to both captions, which is right, since both are true of both.
    unit = torch.nn.functional.normalize
    texts = unit(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    images = unit(torch.tensor([[1.0, 0.414, 0.0], [1.0, 0.414, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    both_true = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)

    def change_of_image0_similarity_to_red_square_caption(positives):
        x = images.clone().requires_grad_()
        multi_positive_clip_loss(x, texts, torch.tensor(20.0), positives).backward()
        return -(x.grad[0] @ texts[1]).item()  # along a gradient descent step

    # Plain CLIP loss (only the drawn caption true) pushes image 0 away from "a red square".
    assert change_of_image0_similarity_to_red_square_caption(torch.eye(3, dtype=torch.bool)) < -0.1
    assert abs(change_of_image0_similarity_to_red_square_caption(both_true)) < 1e-3


def test_training_says_about_how_long_is_left_after_each_epoch_but_the_last(tmp_path):
    lines = []
    recipe = training_recipe(samples=64, epochs=3, batch_size=16)
    train_tiny_clip(tmp_path / "tiny.pt", recipe, log=lines.append)
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all(" s left)" in line for line in epochs[:2]) and "left" not in epochs[2]
    assert time_left(30, 1, 12) == ", about 5 min 30 s left" and time_left(10, 2, 12) == ", about 50 s left"
