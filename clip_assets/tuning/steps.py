"""The adapter and fine-tuning steps as plain functions: labels to adapters, captions to a checkpoint.

The Dagster assets call these and turn the returned summaries into materialization metadata; tests
call them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from clip_assets.classification.rules import NO_ADAPTER
from clip_assets.config.layout import DataLayout
from clip_assets.model.fine_tuned_weights import record_fine_tuned_checkpoint
from clip_assets.storage.warehouse import read_centroids
from clip_assets.tuning.adapter_evaluation import fit_on_tuning_half, load_labelled_embeddings
from clip_assets.tuning.adapter_store import adapter_version, remove_adapters, write_adapter_file
from clip_assets.tuning.adapters import AdapterSet
from clip_assets.tuning.fine_tuning import FineTuneOptions, FineTuneReport, fine_tune_to_checkpoint
from clip_assets.tuning.label_sources import combined_labels, combined_version


@dataclass
class AdapterSummary:
    version: str  # NO_ADAPTER without labels
    adapters: AdapterSet | None = None
    labelled_images: int = 0  # labelled images with embeddings of the centroids' model
    heldout_images: int = 0  # never used to fit or choose
    without_embeddings: int = 0  # label rows naming no embedded image (not embedded yet, or a wrong path)
    unknown_categories: list[str] = field(default_factory=list)


def write_adapters(layout: DataLayout, labels_path: Path | None, shots: int | None = None) -> AdapterSummary:
    """Fit each prompt file's adapter on the tuning half of the labelled images (the labels file and
    the review pages' verdicts together: clip_assets.tuning.label_sources.combined_labels) and store
    it; without labels, remove any stored adapters so classification is zero-shot. Bad labels raise
    before the stored adapters are touched."""
    store = layout.review_labels_path
    labels = combined_labels(labels_path, store)
    if labels is None:
        remove_adapters(layout.adapters_path)
        return AdapterSummary(NO_ADAPTER)
    centroids = read_centroids(layout.duckdb_path)
    data = load_labelled_embeddings(layout, labels, centroids)
    version = adapter_version(combined_version(labels_path, store), centroids, shots)
    adapters = fit_on_tuning_half(data, centroids, shots, version)
    write_adapter_file(adapters, layout.adapters_path)
    return AdapterSummary(version, adapters, len(data.image_ids), int(data.heldout.sum()),
                          len(data.without_embeddings), data.unknown_categories)


def write_fine_tuned_model(model_name: str, pretrained: str, captions_file: Path, image_root: Path,
                           layout: DataLayout, options: FineTuneOptions, device: str | None = None,
                           log: Callable[[str], None] = print) -> FineTuneReport:
    """Tune the configured model on the captions file, write the checkpoint (named by its content hash)
    and make it the one an opted-in deployment's embeddings and centroids use. A bad captions file
    raises before anything is written."""
    report = fine_tune_to_checkpoint(model_name, pretrained, captions_file, image_root, layout.data_dir, options,
                                     device, log)
    record_fine_tuned_checkpoint(layout, report.checkpoint)
    return report

