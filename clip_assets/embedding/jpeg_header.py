"""A JPEG's header read without decoding it: whether the batch decoder (nvJPEG, or libjpeg-turbo
through torchvision) can take the file as it is, and its EXIF orientation, applied afterwards to the
decoded tensor as Pillow's `ImageOps.exif_transpose` would. Part of the tensor decode path
(clip_assets.embedding.tensor_decode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_SOF_SEQUENTIAL_HUFFMAN = (0xC0, 0xC1)  # baseline and extended sequential: what nvJPEG batch-decodes
_SOF_OTHER = (0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}


@dataclass(frozen=True)
class JpegHeader:
    batch_decodable: bool  # baseline/extended Huffman, 8-bit, grey or YCbCr, ends with EOI
    orientation: int  # EXIF orientation, 1 (as stored) to 8
    why_not: str | None = None
    pixels: int = 0  # width x height, from the frame header


def _exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of IFD0 in an Exif TIFF block, 1 when absent or malformed."""
    if tiff[:4] == b"II*\x00":
        order = "little"
    elif tiff[:4] == b"MM\x00*":
        order = "big"
    else:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for k in range(int.from_bytes(tiff[ifd : ifd + 2], order)):
        entry = tiff[ifd + 2 + 12 * k : ifd + 14 + 12 * k]
        if len(entry) < 12:
            return 1
        if int.from_bytes(entry[:2], order) == 0x0112 and int.from_bytes(entry[2:4], order) == 3:
            value = int.from_bytes(entry[8:10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def sniff_jpeg(data: bytes) -> JpegHeader:
    """Read a JPEG's markers up to the first scan: can the batch decoder take it, and its orientation."""
    if data[:2] != b"\xff\xd8":
        return JpegHeader(False, 1, "not a JPEG")
    orientation, sof, precision, component_ids, adobe_transform, pixels = 1, None, None, (), None, 0
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return JpegHeader(False, orientation, "malformed marker")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE_MARKERS:
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        segment = data[i + 4 : i + 2 + length]
        if marker == 0xE1 and segment[:6] == b"Exif\x00\x00" and orientation == 1:
            orientation = _exif_orientation(segment[6:])
        elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe_transform = segment[11]
        elif marker in _SOF_SEQUENTIAL_HUFFMAN or marker in _SOF_OTHER:
            sof, precision = marker, segment[0] if segment else None
            pixels = int.from_bytes(segment[1:3], "big") * int.from_bytes(segment[3:5], "big")
            count = segment[5] if len(segment) > 5 else 0
            component_ids = tuple(segment[6 + 3 * c] for c in range(count) if 6 + 3 * c < len(segment))
        elif marker == 0xDA:  # start of scan: the header is over
            break
        i += 2 + length
    if sof is None:
        return JpegHeader(False, orientation, "no frame header")
    if sof not in _SOF_SEQUENTIAL_HUFFMAN:
        return JpegHeader(False, orientation, "progressive, lossless or arithmetic-coded")
    if precision != 8:
        return JpegHeader(False, orientation, f"{precision}-bit samples")
    if len(component_ids) not in (1, 3):
        return JpegHeader(False, orientation, f"{len(component_ids)} components (CMYK/YCCK)")
    if len(component_ids) == 3 and (adobe_transform == 0 or component_ids == (82, 71, 66)):
        return JpegHeader(False, orientation, "stored as RGB, not YCbCr")
    if data[-2:] != b"\xff\xd9":
        return JpegHeader(False, orientation, "no end-of-image marker (truncated?)")
    return JpegHeader(True, orientation, pixels=pixels)


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """What Pillow's `ImageOps.exif_transpose` does, on a (..., H, W) tensor."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1).flip(-2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return image.transpose(-1, -2).flip(-1)
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return image.transpose(-1, -2).flip(-2)
    return image
