"""Dagster resources: where the collection lives, and the model that encodes it."""

from __future__ import annotations

import functools
from pathlib import Path

import dagster as dg

from clip_assets.clip_model import ClipModel, load_clip_model
from clip_assets.layout import DataLayout


class ImageCollection(dg.ConfigurableResource):
    """The image root, the prompt files and the data directory of one deployment."""

    image_root: str
    prompts_dir: str
    data_dir: str
    max_failure_share: float = 0.05  # the failure-rate check warns above this share of a batch

    @property
    def layout(self) -> DataLayout:
        return DataLayout(Path(self.data_dir))


@functools.lru_cache(maxsize=2)
def _load_once_per_process(model: str, pretrained: str, device: str | None) -> ClipModel:
    return load_clip_model(model, pretrained, device)


class ClipModelResource(dg.ConfigurableResource):
    """An open_clip model, loaded once per process however many batches a run covers."""

    model: str
    pretrained: str
    device: str | None = None
    batch_size: int = 64
    num_workers: int = -1
    file_timeout_s: float = 60.0

    def load(self) -> ClipModel:
        return _load_once_per_process(self.model, self.pretrained, self.device)
