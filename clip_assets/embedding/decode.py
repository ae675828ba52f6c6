"""Decoding one image file as the model should see it, with Pillow alone (no torch): first frame,
EXIF orientation, RGB, a large JPEG decoded at a reduced DCT scale; the fingerprint of its bytes, and
the reason recorded for a file that cannot be decoded. The embedding engine's workers, the tensor
decode path's fallback, image queries and fine-tuning all decode through here.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # only for a type: importing it loads torch
    from clip_assets.model.clip_model import ClipModel

# JPEGs are decoded at the smallest DCT scale covering twice the model input: the model's resize
# then works from a sharper image (mean pixel error vs full decoding ~0.003 on ViT-B-32, well
# under the 0.08-0.19 by which bilinear and bicubic resizing differ; see the tests).
DRAFT_OVERSAMPLE = 2


def fingerprint(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:20]


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB pixels for any mode Pillow opens: 16-bit, palette with transparency, alpha, CMYK, grey."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.uint32)
        top = 65535 if img.mode.startswith("I;16") or arr.max() > 255 else 255
        img = Image.fromarray((arr * 255 // max(top, 1)).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def failure_reason(exc: BaseException) -> str:
    """The reason recorded for a file that could not be read or decoded, said plainly."""
    if isinstance(exc, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        return f"decompression bomb: {exc}"
    if isinstance(exc, UnidentifiedImageError):  # Pillow's own text names an in-memory buffer, not the file
        return "UnidentifiedImageError: cannot identify image file (not an image, or a format Pillow cannot read)"
    return f"{type(exc).__name__}: {exc}"


def too_many_pixels(pixels: int) -> bool:
    """More pixels than Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS; None: no limit)."""
    return Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS


def decode_image(data: bytes, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode from memory the way the model should see it: first frame, EXIF orientation, RGB.

    With `min_size` (the model's input width and height), a JPEG is decoded at the smallest DCT
    scale that still covers it in both dimensions. An image over Pillow's decompression-bomb limit
    raises (Pillow itself only warns up to twice the limit).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        opened = Image.open(io.BytesIO(data))
    with opened as img:
        if min_size is not None and img.format == "JPEG":
            img.draft(img.mode, min_size)
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def draft_size(clip: ClipModel) -> tuple[int, int] | None:
    if clip.input_size is None:
        return None
    return (clip.input_size[0] * DRAFT_OVERSAMPLE, clip.input_size[1] * DRAFT_OVERSAMPLE)


def load_rgb(path: Path, min_size: tuple[int, int] | None = None) -> Image.Image:
    return decode_image(path.read_bytes(), min_size)
