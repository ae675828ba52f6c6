"""Models made for tests without a download: the tiny architecture's random checkpoints, and ViT-S-32
with seeded random weights (real open_clip, ViT-B-32's preprocessing)."""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch

from clip_assets.model.clip_model import ClipModel, _input_size, register_model_configs

TINY = "clip-assets-tiny"
CPU = torch.device("cpu")


def save_random_checkpoint(path: Path, seed: int) -> Path:
    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def seeded_vit_s_32() -> ClipModel:
    """ViT-S-32 with random weights (seeded: the same every call): ViT-B-32's preprocessing, real
    open_clip, no download."""
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-S-32")
    model.eval()
    return ClipModel(model, preprocess, open_clip.get_tokenizer("ViT-S-32"), "ViT-S-32/random-seed0", CPU,
                     int(model.text_projection.shape[1]), 100.0, _input_size(model))
