"""Training a tiny open_clip model on synthetic shape images and their captions, so the demo runs
with real weights and no model hub.

The loss is CLIP's contrastive loss with every caption in the batch that is true of an image counted
as its match (not only the caption drawn for it): with short captions, "a square" is drawn for many
images of a batch, and plain CLIP loss would push each of those images away from the others'
identical captions. Some captions of two-shape images name one shape, so an image embedding learns
to carry every shape it holds, which the prompt file's multi-label rule needs.

The training images are drawn fresh from their own seed: the demo collection is never trained on.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import random
import time
from pathlib import Path
from typing import Callable

import open_clip
import torch

from clip_assets.demo.captions import training_caption
from clip_assets.demo.shapes import make_sample
from clip_assets.model.clip_model import register_model_configs
from clip_assets.storage.atomic_files import write_bytes_atomically
from clip_assets.tuning.contrastive_training import adamw, contrastive_step, warmup_cosine

DEMO_MODEL = "clip-assets-tiny"


def training_recipe(samples: int = 5500, epochs: int = 12, batch_size: int = 64, lr: float = 2e-3, seed: int = 1234,
                    partial_captions: float = 0.7, background_tints: bool = True) -> dict:
    # Chosen by comparing the demo's zero-shot F1 on its own collection (never trained on) between
    # recipes of about the same CPU time (benchmarks/demo_recipe.py prints them per training seed).
    return {"model": DEMO_MODEL, "samples": samples, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
            "partial_captions": partial_captions, "background_tints": background_tints, "loss": "multi-positive", "generator": 2}


def multi_positive_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                             positives: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy with soft targets: positives[i, j] says caption j is true of image i.

    Each image's target is spread evenly over its true captions, each caption's over the images it
    is true of. With only the diagonal true this is open_clip's ClipLoss.
    """
    logits = logit_scale * image_features @ text_features.T
    targets = positives.float()
    per_image = -(targets / targets.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    per_caption = -(targets.T / targets.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return (per_image + per_caption) / 2


def checkpoint_path(cache_dir: Path, recipe: dict) -> Path:
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir / f"{recipe['model']}-shapes-{digest}.pt"


def time_left(elapsed_s: float, done: int, total: int) -> str:
    """A progress line's tail, e.g. ", about 1 min 20 s left": the epochs to go at the pace of those done."""
    left = round(elapsed_s / done * (total - done)) if done else 0
    if done >= total:
        return ""
    return f", about {left // 60} min {left % 60:02d} s left" if left >= 60 else f", about {left} s left"


def train_tiny_clip(checkpoint: Path, recipe: dict, log: Callable[[str], None] = print) -> Path:
    """Train once and save an open_clip checkpoint; a checkpoint already there is reused."""
    if checkpoint.is_file():
        log(f"using cached checkpoint {checkpoint}")
        return checkpoint
    register_model_configs()
    torch.manual_seed(recipe["seed"])
    rng = random.Random(recipe["seed"])
    log(f"training {recipe['model']} from scratch on generated image-caption pairs")
    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that no pretrained weights were loaded
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(recipe["model"])
    finally:
        logging.getLogger().setLevel(previous)
    tokenizer = open_clip.get_tokenizer(recipe["model"])
    started = time.monotonic()
    samples = [make_sample(rng, rng.choice([(96, 96), (128, 96), (96, 128)])) for _ in range(recipe["samples"])]
    pixels = torch.stack([preprocess(s.image) for s in samples])
    log(f"generated {len(samples)} training images in {time.monotonic() - started:.1f} s")

    optimizer = adamw(model, recipe["lr"])
    bs = recipe["batch_size"]
    steps_per_epoch = len(samples) // bs
    schedule = warmup_cosine(optimizer, steps_per_epoch * recipe["epochs"])
    model.train()
    epochs_started = time.monotonic()
    for epoch in range(recipe["epochs"]):
        order = torch.randperm(len(samples)).tolist()
        running = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * bs : (b + 1) * bs]
            captions = [training_caption(samples[i], rng, recipe["partial_captions"], recipe.get("background_tints", False)) for i in idx]
            tokens = tokenizer([c.text for c in captions])
            positives = torch.tensor([[c.is_true_of(samples[i]) for c in captions] for i in idx])
            batch_pixels = pixels[idx]
            if rng.random() < 0.5:
                batch_pixels = batch_pixels.flip(-1)
            loss = functools.partial(multi_positive_clip_loss, positives=positives)
            running += contrastive_step(model, batch_pixels, tokens, loss, optimizer, schedule)
        log(f"epoch {epoch + 1}/{recipe['epochs']}: contrastive loss {running / steps_per_epoch:.3f} "
            f"({time.monotonic() - started:.0f} s{time_left(time.monotonic() - epochs_started, epoch + 1, recipe['epochs'])})")
    serialised = io.BytesIO()  # in memory first: torch's file writer fails unclearly on a full disk
    torch.save({"state_dict": model.state_dict(), "recipe": recipe}, serialised)
    write_bytes_atomically(serialised.getbuffer(), checkpoint)
    log(f"trained {recipe['model']} in {time.monotonic() - started:.0f} s -> {checkpoint}")
    return checkpoint
