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
import re
from pathlib import Path

from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import Settings
from clip_assets.storage.atomic_files import write_text_atomically
from clip_assets.storage.damaged_files import FINE_TUNED_CHECKPOINT, FINE_TUNED_RECORD
from clip_assets.storage.file_hashes import CONTENT_DIGEST_CHARS, content_digest, current_content_digest

_NAMED_DIGEST = re.compile(rf"-fine-tuned-([0-9a-f]{{{CONTENT_DIGEST_CHARS}}})\.pt$")


class NoFineTunedModelError(RuntimeError):
    """The deployment opted in to the fine-tuned model, and there is none (yet)."""


def checkpoint_name(model_name: str, digest: str) -> str:
    """A fine-tuned checkpoint's file name: the architecture and the content digest of its bytes."""
    return f"{model_name.replace('/', '-')}-fine-tuned-{digest}.pt"


def check_fine_tuned_checkpoint(checkpoint: Path) -> None:
    """A checkpoint named by its content (checkpoint_name) whose bytes no longer hash to its name was
    damaged after it was written: DamagedFileError, before torch meets it. Other files pass."""
    named = _NAMED_DIGEST.search(Path(checkpoint).name)
    if named and Path(checkpoint).is_file():
        actual = current_content_digest(checkpoint)
        if actual != named[1]:
            raise FINE_TUNED_CHECKPOINT.damaged(
                checkpoint, f"its bytes hash to {actual}, its name says {named[1]}: changed since it was written")


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
    with FINE_TUNED_RECORD.reading(pointer, errors=(OSError, ValueError, KeyError, TypeError)):
        checkpoint = layout.fine_tuned_models_dir / Path(json.loads(pointer.read_text())["checkpoint"]).name
    if not checkpoint.is_file():
        raise NoFineTunedModelError(
            f"{pointer} names {checkpoint.name}, which is not in {checkpoint.parent} any more: "
            "re-materialize fine_tuned_model."
        )
    check_fine_tuned_checkpoint(checkpoint)
    return checkpoint


def weights_in_use(pretrained: str, use_fine_tuned: bool, layout: DataLayout) -> str:
    """What to load: `pretrained`, or the fine-tuned checkpoint's path when the deployment opted in."""
    return str(fine_tuned_checkpoint(layout)) if use_fine_tuned else pretrained


def configured_weights(settings: Settings) -> str:
    """The weights the deployment's embeddings were made with, for what encodes queries (the search)."""
    return weights_in_use(settings.pretrained, settings.use_fine_tuned, DataLayout(settings.data_dir))
