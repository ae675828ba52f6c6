"""Batch-encoding the usable images of a manifest with an OpenCLIP model.

Decoding and the model's own preprocessing run in DataLoader workers, overlapping with inference.
An image that fails to decode is recorded with its reason and the batch goes on.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from clip_assets.clip_model import ClipModel
from clip_assets.manifest import STATUS_OK

log = logging.getLogger(__name__)

FAILURES_SCHEMA = pa.schema(
    [pa.field("image_id", pa.string()), pa.field("path", pa.string()), pa.field("error", pa.string())]
)


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("model", pa.string(), nullable=False),
        ]
    )


def load_rgb(path: Path) -> Image.Image:
    """Decode an image the way the model should see it: EXIF orientation applied, RGB."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")


class _ImageFiles(Dataset):
    def __init__(self, image_root: Path, paths: list[str], preprocess):
        self.image_root = image_root
        self.paths = paths
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            pixels = self.preprocess(load_rgb(self.image_root / self.paths[index]))
            return index, pixels, None
        except Exception as exc:  # one bad file must not stop the batch
            return index, None, f"{type(exc).__name__}: {exc}"


def _collate(items):
    ok = [(i, p) for i, p, err in items if err is None]
    failed = [(i, err) for i, _, err in items if err is not None]
    indices = [i for i, _ in ok]
    pixels = torch.stack([p for _, p in ok]) if ok else None
    return indices, pixels, failed


def default_num_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))


@dataclass
class EmbeddingOutput:
    embeddings: pa.Table
    failures: pa.Table


def embed_manifest(
    clip: ClipModel,
    image_root: Path,
    manifest: pa.Table,
    batch_size: int = 64,
    num_workers: int = -1,
    progress_every_s: float = 5.0,
) -> EmbeddingOutput:
    """Encode every manifest row with status ok; rows that fail to decode go to `failures`."""
    usable = manifest.filter(pc.equal(manifest["status"], STATUS_OK))
    ids = usable["image_id"].to_pylist()
    paths = usable["path"].to_pylist()
    workers = default_num_workers() if num_workers < 0 else num_workers
    loader = DataLoader(
        _ImageFiles(image_root, paths, clip.preprocess),
        batch_size=batch_size,
        num_workers=workers if len(paths) > batch_size else 0,
        collate_fn=_collate,
        pin_memory=clip.device.type == "cuda",
    )
    vectors = np.empty((len(paths), clip.embed_dim), dtype=np.float32)
    encoded = np.zeros(len(paths), dtype=bool)
    failures: list[tuple[int, str]] = []
    started = last_report = time.monotonic()
    for indices, pixels, failed in loader:
        failures.extend(failed)
        if pixels is not None:
            vectors[indices] = clip.encode_image_tensors(pixels).numpy()
            encoded[indices] = True
        now = time.monotonic()
        if now - last_report >= progress_every_s:
            done = int(encoded.sum()) + len(failures)
            rate = done / (now - started)
            eta = (len(paths) - done) / rate if rate else float("nan")
            log.info("embedded %d/%d images, %.1f images/s, ETA %.0f s", done, len(paths), rate, eta)
            last_report = now
    kept = np.flatnonzero(encoded)
    embeddings = pa.table(
        {
            "image_id": pa.array([ids[i] for i in kept], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors[kept].reshape(-1), pa.float32()), clip.embed_dim
            ),
            "model": pa.array([clip.identity] * len(kept), pa.string()),
        },
        schema=embeddings_schema(clip.embed_dim),
    )
    failures.sort()
    failure_table = pa.table(
        {
            "image_id": [ids[i] for i, _ in failures],
            "path": [paths[i] for i, _ in failures],
            "error": [err for _, err in failures],
        },
        schema=FAILURES_SCHEMA,
    )
    return EmbeddingOutput(embeddings=embeddings, failures=failure_table)


def embeddings_matrix(table: pa.Table) -> np.ndarray:
    """The `embedding` column as an (n, dim) float32 array, without a Python loop."""
    column = table["embedding"].combine_chunks()
    if len(column) == 0:
        return np.empty((0, column.type.list_size), dtype=np.float32)
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
