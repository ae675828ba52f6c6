"""The adapters file (`<data dir>/adapters/category_adapters.npz`): written by `category_adapters`,
read by classification. Absent means no adapter: classification is zero-shot.

Its version, recorded in every classification row, is a hash of what the adapters were built from:
the labels file's content, the prompt version, the model, the shots setting and the format.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from clip_assets.classification.centroids import CentroidSet
from clip_assets.storage.atomic_files import atomic_write, remove_file
from clip_assets.storage.damaged_files import ADAPTERS, READ_ERRORS
from clip_assets.tuning.adapters import AdapterSet, FileAdapter

FORMAT = 2  # 2: thresholds calibrated on the whole tuning half, not only the images the correction learnt from
_ARRAYS = ("columns", "thresholds", "neutral_margins", "keys", "values", "alpha", "weight_change", "applies",
           "labels_used")
_FIELDS = ("source", "mode", "kind", "description", "cv_macro_f1", "beta", "images_used", "calibration_images")


class AdapterMismatchError(ValueError):
    """The stored adapters were built for other centroids (another prompt version or model)."""


def adapter_version(labels_hash: str, centroids: CentroidSet, shots: int | None) -> str:
    key = json.dumps([FORMAT, labels_hash, centroids.prompt_version, centroids.model, shots or 0])
    return "adapt-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def write_adapter_file(adapters: AdapterSet, path: Path) -> None:
    arrays = {}
    files = []
    for i, f in enumerate(adapters.files):
        for name in _ARRAYS:
            value = getattr(f, name)
            if value is not None:
                arrays[f"{i}/{name}"] = np.asarray(value)
        files.append({name: getattr(f, name) for name in _FIELDS})
    meta = {"format": FORMAT, "model": adapters.model, "prompt_version": adapters.prompt_version,
            "version": adapters.version, "files": files}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as out:
            np.savez(out, **arrays)


def remove_adapters(path: Path) -> bool:
    """No labels: no adapters file, so classification is zero-shot. Returns whether one was removed."""
    existed = Path(path).is_file()
    remove_file(path)
    return existed


def read_adapters(path: Path) -> AdapterSet | None:
    """The stored adapters; None without a file. A damaged file raises DamagedFileError, which names it
    and the command that rebuilds it (clip_assets.storage.damaged_files)."""
    path = Path(path)
    if not path.is_file():
        return None
    with ADAPTERS.reading(path, errors=READ_ERRORS + (KeyError, TypeError, AttributeError)):
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes().decode())
            files = []
            for i, fields in enumerate(meta["files"]):
                arrays = {name: data[f"{i}/{name}"] for name in _ARRAYS if f"{i}/{name}" in data}
                files.append(FileAdapter(**fields, **arrays))
        return AdapterSet(files, meta["model"], meta["prompt_version"], meta["version"])


def adapters_for(path: Path, centroids: CentroidSet) -> AdapterSet | None:
    """The stored adapters, refused when built for other centroids (they would correct the wrong scores)."""
    adapters = read_adapters(path)
    if adapters is not None and (adapters.prompt_version, adapters.model) != (centroids.prompt_version, centroids.model):
        raise AdapterMismatchError(
            f"The adapters in {path} were built for prompt version {adapters.prompt_version} of "
            f"'{adapters.model}', but the centroids are prompt version {centroids.prompt_version} of "
            f"'{centroids.model}'. Materialize category_adapters (the automation sensor does it after a prompt "
            "edit) before image_classifications."
        )
    return adapters
