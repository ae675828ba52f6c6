"""The model's own preprocessing (open_clip's eval transform) as tensor operations on batches of
decoded uint8 images on their device: part of the tensor decode path (clip_assets.embedding.tensor_decode).
Each step is translated from the transform open_clip returns with the model, never re-stated here.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from open_clip.transform import CenterCropOrPad, MaybeToTensor, ResizeKeepRatio

from clip_assets.model.pillow_preprocess import is_rgb_conversion

# Decoded pixels held at once while resizing: a batch of 4000x3000 photos is resized a few at a
# time rather than all at once (one 12-megapixel image is 144 MB as float32).
RESIZE_PIXELS_PER_CALL = 64_000_000


class UnsupportedTransform(ValueError):
    """The model's preprocessing holds a step with no tensor equivalent here: use the Pillow path."""


def _resize_keep_ratio(step: ResizeKeepRatio) -> Callable[[torch.Tensor], torch.Tensor]:
    def resize(images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        # open_clip's own size rule; it reads the size off a PIL image, so hand it one shaped alike
        size = ResizeKeepRatio.get_params(SimpleNamespace(size=(width, height)), step.size, step.longest)
        return TF.resize(images, size, step.interpolation, antialias=True)

    return resize


class TensorPreprocess:
    """The model's own eval transform, applied to decoded uint8 tensors in batches on their device.

    Built from the transform open_clip returns with the model: each geometric step (Resize,
    CenterCrop, open_clip's ResizeKeepRatio and CenterCropOrPad) keeps its own parameters and runs
    on uint8 tensors, rounding like Pillow; ToTensor and Normalize run once for the whole batch. A
    step it does not know raises `UnsupportedTransform`, so nothing is silently approximated.
    """

    def __init__(self, transform):
        steps = getattr(transform, "transforms", [transform])
        self.geometry: list[Callable[[torch.Tensor], torch.Tensor]] = []
        self.mean = self.std = None
        to_tensor_seen = False
        for step in steps:
            if isinstance(step, (T.Resize, T.CenterCrop, CenterCropOrPad)) and not to_tensor_seen:
                self.geometry.append(step)
            elif isinstance(step, ResizeKeepRatio) and not to_tensor_seen:
                self.geometry.append(_resize_keep_ratio(step))
            elif is_rgb_conversion(step):
                continue  # decoded as RGB already
            elif isinstance(step, (T.ToTensor, MaybeToTensor)):
                to_tensor_seen = True
            elif isinstance(step, T.Normalize) and to_tensor_seen and self.mean is None:
                self.mean, self.std = tuple(step.mean), tuple(step.std)
            else:
                raise UnsupportedTransform(f"no tensor equivalent for the preprocessing step {step!r}")
        if not to_tensor_seen:
            raise UnsupportedTransform("the preprocessing has no ToTensor step")

    def _geometry(self, images: torch.Tensor) -> torch.Tensor:
        for step in self.geometry:
            images = step(images)
        return images

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 (3, H, W) RGB tensors of any sizes, on one device -> normalised float32 (N, 3, h, w)."""
        out: list[torch.Tensor | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for k, image in enumerate(images):
            by_size.setdefault(tuple(image.shape[-2:]), []).append(k)
        for (height, width), members in by_size.items():
            per_call = max(1, RESIZE_PIXELS_PER_CALL // (height * width))
            for start in range(0, len(members), per_call):
                group = members[start : start + per_call]
                resized = self._geometry(torch.stack([images[k] for k in group]))
                for k, image in zip(group, resized):
                    out[k] = image
        batch = torch.stack(out).float().div_(255)
        if self.mean is not None:
            mean = torch.tensor(self.mean, device=batch.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=batch.device).view(1, -1, 1, 1)
            batch = batch.sub_(mean).div_(std)
        return batch
