"""The decode workers' preprocessing (one resample of the kept region, one normalising pass) gives
the pixels of the model's own transform up to rounding, the same embeddings, and leaves transforms it
does not reproduce to themselves."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clip_assets.model.pillow_preprocess import FusedResizeCrop, fused_preprocess
from clip_assets_tests.support.images import photo_like

SIZES = [(640, 480), (480, 640), (1000, 750), (225, 224), (224, 224), (97, 300), (3000, 97), (333, 500)]


def pixels_apart(a: torch.Tensor, b: torch.Tensor, std) -> float:
    """Largest difference between two normalised tensors, in 1/255 steps of the original pixels."""
    return float(((a - b).abs() * torch.tensor(std).view(-1, 1, 1)).max() * 255)


@pytest.mark.parametrize("model", ["ViT-S-32", "clip-assets-tiny"])
def test_the_fused_step_gives_the_model_transform_pixels(model, clip):
    transform = clip.preprocess if model == "clip-assets-tiny" else open_clip.create_model_and_transforms(model)[2]
    fused = fused_preprocess(transform)
    assert isinstance(fused, FusedResizeCrop)
    std = transform.transforms[-1].std
    for k, size in enumerate(SIZES):
        img = photo_like(*size, seed=k)  # smooth shapes and per-pixel noise, where resampling differences show
        expected, got = transform(img), fused(img)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        # Pillow may order its two resampling passes otherwise with a box: a pixel at most two steps apart.
        assert pixels_apart(got, expected, std) <= 2.01, size
        steps = (got - expected).abs() * torch.tensor(std).view(-1, 1, 1) * 255
        assert float((steps > 0.5).float().mean()) < 0.3, size
    grey = photo_like(500, 400, seed=99).convert("L")
    assert pixels_apart(fused(grey), transform(grey), std) <= 2.01


def test_the_fused_step_gives_the_same_embeddings(vit_s_32):
    fused = fused_preprocess(vit_s_32.preprocess)
    rng = np.random.default_rng(0)
    # Pure noise in portrait sizes too: where Pillow orders its passes otherwise, pixels differ most.
    noise = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(333, 500), (97, 300)]]
    images = [photo_like(*size, seed=k) for k, size in enumerate(SIZES)] + noise
    with torch.inference_mode():
        expected = vit_s_32.encode_image_tensors(torch.stack([vit_s_32.preprocess(i) for i in images]))
        got = vit_s_32.encode_image_tensors(torch.stack([fused(i) for i in images]))
    cosine = torch.nn.functional.cosine_similarity(got.float(), expected.float())
    others = expected.float() @ expected.float().T
    assert float(others[~torch.eye(len(images), dtype=torch.bool)].max()) < 0.99  # the model tells them apart
    assert float(cosine.min()) >= 0.9999


@pytest.mark.parametrize("mode", ["longest", "squash"])
def test_other_resize_modes_keep_the_model_transform(mode):
    transform = open_clip.image_transform(224, is_train=False, resize_mode=mode)
    assert fused_preprocess(transform) is transform
