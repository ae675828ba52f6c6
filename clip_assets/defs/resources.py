"""Dagster resources: where the collection lives, and the model that encodes it."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import dagster as dg

from clip_assets.tuning import calibration

from clip_assets.model.clip_model import ClipModel, load_clip_model, tuned_for_inference
from clip_assets.model.fine_tuned_weights import weights_in_use
from clip_assets.tuning.fine_tuning import FineTuneOptions
from clip_assets.embedding.gpu_claim import DEFAULT_LOCK_DIR, device_for_embedding_step
from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import default


class ImageCollection(dg.ConfigurableResource):
    """The image root, the prompt files and the data directory of one deployment."""

    image_root: str
    prompts_dir: str
    data_dir: str
    max_failure_share: float = default("max_failure_share")  # the failure-rate check warns above this share of a batch
    duplicate_threshold: float = default("duplicate_threshold")  # cosine similarity for near_duplicates

    @property
    def layout(self) -> DataLayout:
        return DataLayout(Path(self.data_dir))


@functools.lru_cache(maxsize=2)
def _load_once_per_process(model: str, pretrained: str, device: str | None, channels_last: bool,
                           compile_model: bool, precision: str) -> ClipModel:
    return tuned_for_inference(load_clip_model(model, pretrained, device), channels_last, compile_model, precision)


class ClipModelResource(dg.ConfigurableResource):
    """An open_clip model, loaded once per process however many batches a run covers."""

    model: str
    pretrained: str
    device: str | None = None
    batch_size: int = default("batch_size")
    num_workers: int = default("num_workers")
    file_timeout_s: float = default("file_timeout_s")
    chunk_rows: int = default("chunk_rows")  # images per part file: what a killed run re-encodes at most
    flush_interval_s: float = default("flush_interval_s")  # ... or this many seconds of work, if sooner
    decode: str = default("decode")  # auto, pillow or tensor (tensor_decode.py)
    precision: str = default("precision")  # of the image tower: auto, float32, bfloat16 or int8 (clip_model.py)
    channels_last: bool = default("channels_last")
    compile_model: bool = default("compile_model")
    gpu_lock_dir: str = str(default("gpu_lock_dir"))
    use_fine_tuned: bool = default("use_fine_tuned")  # encode with fine_tuned_model's checkpoint, not `pretrained`

    def load(self, layout: DataLayout, claim_gpu: bool = False) -> ClipModel:
        """The model that encodes images and prompts: `pretrained`'s, or the fine-tuned one the deployment
        opted in to (found under `layout`). `claim_gpu`: for the embedding step, which takes a GPU of its
        own where there are several."""
        weights = weights_in_use(self.pretrained, self.use_fine_tuned, layout)
        device = self.device
        if claim_gpu:
            device = device_for_embedding_step(device, Path(self.gpu_lock_dir), logging.getLogger(__name__).info)
        return _load_once_per_process(self.model, weights, device, self.channels_last, self.compile_model,
                                      self.precision)


class CaptionedPairs(dg.ConfigurableResource):
    """The captions file `fine_tuned_model` tunes on, and how it tunes (clip_assets.tuning.fine_tuning)."""

    captions_path: str
    epochs: int = default("fine_tune_epochs")
    lr: float | None = default("fine_tune_lr")
    lock_image: bool = default("fine_tune_lock_image")
    wise_alpha: float | None = default("fine_tune_wise_alpha")  # None: chosen on a validation split

    @property
    def path(self) -> Path:
        return Path(self.captions_path)

    @property
    def options(self) -> FineTuneOptions:
        return FineTuneOptions(lock_image=self.lock_image, epochs=self.epochs, lr=self.lr, wise_alpha=self.wise_alpha)


class LabelledSample(dg.ConfigurableResource):
    """Labels a person assigned to a sample of images (CSV or parquet), and how to calibrate on them."""

    labels_path: str | None = None
    target_precision: float | None = None
    heldout_fraction: float = calibration.DEFAULT_HELDOUT_FRACTION
    adapter_shots: int = default("adapter_shots")  # category_adapters: labelled images per category, 0: all

    @property
    def path(self) -> Path | None:
        return Path(self.labels_path) if self.labels_path else None

    def load(self, collection: ImageCollection) -> calibration.LabelledScores:
        if not self.labels_path:
            raise dg.Failure(
                description="No labels file: set CLIP_ASSETS_LABELS to a CSV or parquet file with a 'path' (or "
                "'image_id') column and a 'labels' column (categories separated by ';', or 'none')."
            )
        return calibration.load_labelled_scores(
            collection.layout, calibration.read_labels_file(Path(self.labels_path))
        )
