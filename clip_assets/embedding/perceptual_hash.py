"""The perceptual hash of an image (imagehash's pHash, 64 bits), computed once where the embedding step
decodes it, and the Hamming distance between two.

pHash looks at the lowest frequencies of the picture in grey (a 32x32 thumbnail's discrete cosine
transform, each of its 8x8 lowest coefficients above or below their median): re-encoding, resizing,
format changes and small colour and brightness shifts move a few of its 64 bits, two different
pictures differ in about half of them. It is the second, independent signal that confirms a copy the
embedding proposes (clip_assets.search.near_duplicates): the embedding says what a picture shows, the
hash how its light is laid out.

Stored in the embeddings file as a signed 64-bit integer (the bits of the hash, first bit highest);
null where it is unknown (a row carried over from a file written before hashes were stored).
The Pillow path hashes the decoded image; the tensor path hashes the image it decoded on the device
(`tensor_hashes`, a 32x32 grey thumbnail made there), so the two paths agree within a few bits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # the tensor path only: the code location loads without torch
    import torch

HASH_BITS = 64
THUMBNAIL_PX = 32  # imagehash's pHash: hash_size 8 x highfreq_factor 4
_WEIGHTS = (1 << np.arange(HASH_BITS - 1, -1, -1, dtype=np.uint64)).astype(np.uint64)


def _as_int64(bits: np.ndarray) -> int:
    """The hash's 64 bits (first bit highest) as a signed 64-bit integer, as the parquet column holds it."""
    value = int((bits.reshape(-1).astype(np.uint64) * _WEIGHTS).sum(dtype=np.uint64))
    return value - (1 << 64) if value >= 1 << 63 else value


def perceptual_hash(image: Image.Image) -> int:
    """imagehash's pHash of a decoded image, as a signed 64-bit integer."""
    import imagehash  # scipy behind it: loaded by the processes that hash, not by the code location

    return _as_int64(imagehash.phash(image).hash)


def tensor_hashes(images: list[torch.Tensor]) -> list[int]:
    """pHash of RGB uint8 (3, H, W) tensors decoded on their device: the grey 32x32 thumbnail (Pillow's
    'L' weights, an antialiased resize) made there, hashed like a Pillow image."""
    import torch
    import torch.nn.functional as F

    if not images:
        return []
    weights = torch.tensor([0.299, 0.587, 0.114], device=images[0].device).view(3, 1, 1)
    small = [
        F.interpolate(
            (image.float() * weights).sum(0)[None, None],
            size=(THUMBNAIL_PX, THUMBNAIL_PX),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0, 0]
        for image in images
    ]
    thumbnails = torch.stack(small).round().clamp(0, 255).to(torch.uint8).cpu().numpy()  # one copy off the device
    return [perceptual_hash(Image.fromarray(t, "L")) for t in thumbnails]


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits in which hashes `a` and `b` (int64 arrays of the same shape) differ."""
    return np.bitwise_count(np.bitwise_xor(a.astype(np.int64), b.astype(np.int64)).view(np.uint64)).astype(np.int16)
