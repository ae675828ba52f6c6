"""Which weights encode images and prompts: the configured ones (`CLIP_ASSETS_PRETRAINED`), or, when
the deployment opts in (`CLIP_ASSETS_USE_FINE_TUNED`), the checkpoint the `fine_tuned_model` asset
wrote last.

That asset records its checkpoint's file name in `<data dir>/fine_tuned_models/fine_tuned_model.json`
after writing it; the embeddings, the centroids and the search read it from there, so all of them
use one model. The checkpoint is named by its content hash and its model identity
(`clip_model.model_identity`) is that hash, so rows written with it never pass for the base model's.
"""

from __future__ import annotations

import json
from pathlib import Path

from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import Settings
from clip_assets.storage.atomic_files import write_text_atomically
from clip_assets.storage.file_hashes import content_digest


class NoFineTunedModelError(RuntimeError):
    """The deployment opted in to the fine-tuned model, and there is none (yet)."""


def checkpoint_version(checkpoint: Path) -> str:
    """The checkpoint's content hash: `fine_tuned_model`'s data version, in its name and model identity."""
    return content_digest(checkpoint)


def record_fine_tuned_checkpoint(layout: DataLayout, checkpoint: Path) -> None:
    """Make `checkpoint` (a file in layout.fine_tuned_models_dir) the one opted-in deployments use."""
    write_text_atomically(json.dumps({"checkpoint": Path(checkpoint).name}) + "\n", layout.fine_tuned_model_in_use_path)


def fine_tuned_checkpoint(layout: DataLayout) -> Path:
    """The checkpoint `fine_tuned_model` wrote last, or an error saying how to build one."""
    pointer = layout.fine_tuned_model_in_use_path
    if not pointer.is_file():
        raise NoFineTunedModelError(
            "CLIP_ASSETS_USE_FINE_TUNED is set, and no fine-tuned model was built yet (no "
            f"{pointer}): materialize fine_tuned_model first (it tunes on CLIP_ASSETS_FINE_TUNE_CAPTIONS), or "
            "unset CLIP_ASSETS_USE_FINE_TUNED to use CLIP_ASSETS_PRETRAINED."
        )
    checkpoint = layout.fine_tuned_models_dir / json.loads(pointer.read_text())["checkpoint"]
    if not checkpoint.is_file():
        raise NoFineTunedModelError(
            f"{pointer} names {checkpoint.name}, which is not in {checkpoint.parent} any more: "
            "re-materialize fine_tuned_model."
        )
    return checkpoint


def weights_in_use(pretrained: str, use_fine_tuned: bool, layout: DataLayout) -> str:
    """What to load: `pretrained`, or the fine-tuned checkpoint's path when the deployment opted in."""
    return str(fine_tuned_checkpoint(layout)) if use_fine_tuned else pretrained


def configured_weights(settings: Settings) -> str:
    """The weights the deployment's embeddings were made with, for what encodes queries (the search)."""
    return weights_in_use(settings.pretrained, settings.use_fine_tuned, DataLayout(settings.data_dir))
