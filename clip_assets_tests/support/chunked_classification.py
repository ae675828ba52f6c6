"""`classify_batch` over an in-memory matrix a bounded number of images at a time: what the
streaming classification (clip_assets.classification.rules.classify_stream) is compared with, and what
benchmarks/classify_throughput.py times. Only they use it, so it lives here.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from clip_assets.classification.centroids import CentroidSet
from clip_assets.classification.rules import DEFAULT_CHUNK_IMAGES, centroid_columns, classify_batch


def classify_in_chunks(
    batch: str,
    image_ids: list[str],
    embeddings: np.ndarray,
    centroids: CentroidSet,
    chunk_images: int = DEFAULT_CHUNK_IMAGES,
    adapters=None,
) -> Iterator[pa.Table]:
    """The rows of `classify_batch`, a bounded number of images at a time."""
    columns = centroid_columns(centroids)
    for start in range(0, len(image_ids), chunk_images):
        stop = start + chunk_images
        yield classify_batch(batch, image_ids[start:stop], embeddings[start:stop], centroids, columns, adapters)
