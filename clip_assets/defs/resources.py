"""Dagster resources: where the collection lives, the model that encodes it, the labels and the captions.

Each is built from the settings once, at the code location's edge (`from_settings`), field by field
under the settings' own names: a resource has no defaults of its own to drift from the settings'.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import Settings
from clip_assets.embedding.gpu_claim import device_for_embedding_step
from clip_assets.embedding.options import EncodeOptions
from clip_assets.model.fine_tuned_weights import weights_in_use
from clip_assets.storage.store_root import StoreRoot, image_root_from
from clip_assets.tuning import calibration
from clip_assets.tuning.label_sources import combined_labels

if TYPE_CHECKING:  # torch and open_clip load in the steps that use a model, not with the code location
    from clip_assets.model.clip_model import ClipModel
    from clip_assets.tuning.fine_tuning import FineTuneOptions


def _settings_named_like(resource: type[dg.ConfigurableResource], settings: Settings, **renamed) -> dict:
    """The settings whose names are the resource's fields (paths as strings, as Dagster config holds them);
    `renamed`: resource field -> settings field, where the two differ."""
    values = {}
    for name in resource.model_fields:
        value = getattr(settings, renamed.get(name, name))
        values[name] = str(value) if isinstance(value, Path) else value
    return values


class ImageCollection(dg.ConfigurableResource):
    """The image root, the prompt files and the data directory of one deployment."""

    image_root: str
    prompts_dir: str
    data_dir: str
    max_failure_share: float  # the failure-rate check warns above this share of a batch
    duplicate_threshold: float  # cosine similarity of look-alikes, for near_duplicates
    copy_threshold: float | None  # cosine similarity of copies set by hand; None: learnt (copy_threshold)
    copy_precision: float  # what the learnt copy threshold keeps
    copy_hash_distance: int  # bits in which two copies' perceptual hashes may differ

    @classmethod
    def from_settings(cls, settings: Settings) -> "ImageCollection":
        return cls(**_settings_named_like(cls, settings))

    @property
    def root(self) -> Path | StoreRoot:
        """The image root: a local folder, or a root in an object store (clip_assets.storage.store_root)."""
        return image_root_from(self.image_root)

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.data_dir)  # a path, or an object-store URL


@functools.lru_cache(maxsize=2)
def _load_once_per_process(model: str, pretrained: str, device: str | None, channels_last: bool,
                           compile_model: bool, precision: str) -> ClipModel:
    from clip_assets.model.clip_model import load_clip_model, tuned_for_inference

    return tuned_for_inference(load_clip_model(model, pretrained, device), channels_last, compile_model, precision)


class ClipModelResource(dg.ConfigurableResource):
    """An open_clip model, loaded once per process however many batches a run covers, and how it encodes."""

    model: str
    pretrained: str
    device: str | None
    precision: str  # of the image tower: auto, float32, bfloat16 or int8 (clip_assets.model.clip_model)
    channels_last: bool
    compile_model: bool
    gpu_lock_dir: str
    use_fine_tuned: bool  # encode with fine_tuned_model's checkpoint, not `pretrained`
    batch_size: int
    num_workers: int
    file_timeout_s: float
    chunk_rows: int  # images per part file: what a killed run re-encodes at most
    flush_interval_s: float  # ... or this many seconds of work, if sooner
    decode: str  # auto, pillow or tensor (clip_assets.embedding.tensor_decode)

    @classmethod
    def from_settings(cls, settings: Settings) -> "ClipModelResource":
        return cls(**_settings_named_like(cls, settings))

    @property
    def encode_options(self) -> EncodeOptions:
        return EncodeOptions.from_settings(self)

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
    epochs: int
    lr: float | None
    lock_image: bool
    wise_alpha: float | None  # None: chosen on a validation split

    @classmethod
    def from_settings(cls, settings: Settings) -> "CaptionedPairs":
        return cls(**_settings_named_like(cls, settings, captions_path="fine_tune_captions", epochs="fine_tune_epochs",
                                          lr="fine_tune_lr", lock_image="fine_tune_lock_image",
                                          wise_alpha="fine_tune_wise_alpha"))

    @property
    def path(self) -> Path:
        return Path(self.captions_path)

    @property
    def options(self) -> FineTuneOptions:
        from clip_assets.tuning.fine_tuning import FineTuneOptions

        return FineTuneOptions(lock_image=self.lock_image, epochs=self.epochs, lr=self.lr, wise_alpha=self.wise_alpha)


class LabelledSample(dg.ConfigurableResource):
    """Labels people assigned to a sample of images, and how to calibrate on them: the labels file
    (CSV or parquet, CLIP_ASSETS_LABELS) and the review pages' verdicts together, the verdicts winning
    where both judge an image on a category (clip_assets.tuning.label_sources.combined_labels)."""

    labels_path: str | None
    adapter_shots: int  # category_adapters: labelled images per category, 0: all
    target_precision: float | None = None
    heldout_fraction: float = calibration.DEFAULT_HELDOUT_FRACTION

    @classmethod
    def from_settings(cls, settings: Settings) -> "LabelledSample":
        return cls(labels_path=str(settings.labels_path) if settings.labels_path else None,
                   adapter_shots=settings.adapter_shots)

    @property
    def path(self) -> Path | None:
        return Path(self.labels_path) if self.labels_path else None

    def load(self, collection: ImageCollection) -> calibration.LabelledScores | None:
        """The labelled images' stored scores; None while there are no labels at all (NO_LABELS says
        how to give some)."""
        layout = collection.layout
        labels = combined_labels(self.path, layout.review_labels_path)
        return None if labels is None else calibration.load_labelled_scores(layout, labels)


NO_LABELS = (
    "No labels yet: review images in the review pages (`clip-assets serve`), or set CLIP_ASSETS_LABELS to a CSV "
    "or parquet file with a 'path' (or 'image_id') column and a 'labels' column (categories separated by ';', "
    "or 'none')."
)


def pipeline_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """The resources every deployment has (fine-tuning adds `captioned_pairs`: clip_assets.defs.tuning)."""
    return {
        "collection": ImageCollection.from_settings(settings),
        "clip_model": ClipModelResource.from_settings(settings),
        "labelled_sample": LabelledSample.from_settings(settings),
    }
