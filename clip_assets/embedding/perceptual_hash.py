"""The perceptual hash of an image (imagehash's pHash, 64 bits), computed once where the embedding step
decodes it, and the Hamming distance between two; and the image's colour layout, which tells two
pictures of the same grey layout apart.

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

pHash sees only how light and dark are laid out: a green disc in the middle of a blue picture and
the same disc in the middle of a pink one hash alike (0 bits apart), and a small model may put them
at 0.997 cosine. The colour layout is the third signal: the picture shrunk to 8x8 cells of mean
red, green and blue (`colour_layout`), and two layouts' distance is 100 x (1 - their correlation)
after the mean of all 192 values is taken off each (`colour_distance`). A brightness change scales
it and leaves the distance near 0; re-encoding, resizing and colour shifts of a tenth keep it under
about 2, a crop of a tenth under about 4.5; two different pictures of one kind sit above about 7
(the demo's shapes, photo-like test images). It is read from the image file where a pair is about
to be called a copy (clip_assets.search.near_duplicates): pairs that far are few.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from clip_assets.embedding.decode import decode_image
from clip_assets.storage.store_root import StoreRoot, read_file_bytes

if TYPE_CHECKING:  # the tensor path only: the code location loads without torch
    import torch

log = logging.getLogger(__name__)

HASH_BITS = 64
THUMBNAIL_PX = 32  # imagehash's pHash: hash_size 8 x highfreq_factor 4
COLOUR_CELLS = 8  # the colour layout: 8 x 8 cells x RGB
# The most two copies' colour layouts may differ (see the module): copies measured at most 4.2 (a crop
# of a tenth), different pictures at least 7.3.
COLOUR_DISTANCE_BOUND = 6.0
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


def colour_layout(image: Image.Image) -> np.ndarray:
    """The picture as 8x8 cells of mean red, green and blue (float32, 8x8x3)."""
    return np.asarray(image.convert("RGB").resize((COLOUR_CELLS, COLOUR_CELLS), Image.BOX), dtype=np.float32)


def colour_distance(a: np.ndarray, b: np.ndarray) -> float:
    """100 x (1 - correlation) of two colour layouts, each with the mean of its values taken off: 0 for
    the same layout at any brightness, 100 for unrelated ones. A flat picture correlates with nothing:
    two flat ones are 0 apart when their colours match within a level of 255, else 100."""
    ca, cb = a.ravel() - a.mean(), b.ravel() - b.mean()
    norm = float(np.linalg.norm(ca) * np.linalg.norm(cb))
    if norm < 1e-6:  # a flat picture: its colour is all there is
        return 0.0 if np.abs(a.astype(np.float32) - b.astype(np.float32)).max(initial=0) <= 1 else 100.0
    return float(100 * (1 - (ca @ cb) / norm))


def colour_layouts_of_files(image_root: Path | StoreRoot, paths: dict) -> dict:
    """{key: the colour layout of the file at its path under the image root (decoded at a small draft
    size), or None where it cannot be read (gone, changed into something that is not an image)}."""
    out = {}
    for key, path in paths.items():
        try:
            out[key] = colour_layout(decode_image(read_file_bytes(image_root, path), (64, 64)))
        except Exception as exc:  # noqa: BLE001 - a file that cannot be read confirms nothing
            log.info("colour layout of %s not read: %s", path, exc)
            out[key] = None
    return out
