"""The tensor decode path: JPEGs decoded in batches on the model's device, preprocessed as tensor ops.

On a GPU, decoding is the bottleneck once the model is fast (one CPU core decodes and preprocesses a
640x480 JPEG in about 5 ms). On this path the CPU workers only read and fingerprint each file and
look at its JPEG header; the bytes of every JPEG the batch decoder handles (baseline, 8-bit, grey or
YCbCr, complete) travel to the main process, where torchvision's `decode_jpeg` decodes a whole batch
at once on the model's device (nvJPEG on CUDA, libjpeg-turbo on the CPU, which is how the path is
tested without a GPU). The model's own preprocessing (open_clip's transform: resize mode, size,
interpolation, crop, mean, std) is translated component by component into tensor operations, never
re-stated here, and EXIF orientation is applied to the decoded tensor. Every other file (PNG, WebP,
CMYK, progressive, truncated, ...) is decoded by Pillow in the worker exactly as on the Pillow path,
and a JPEG the batch decoder refuses after all falls back to Pillow on its own, so failures are
recorded the same way on both paths.

While the model encodes one batch, a thread decodes and preprocesses the next (on CUDA on a stream
of its own), so the GPU is not left waiting for the decoder.
"""

from __future__ import annotations

import logging
import queue
import stat
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Iterator, NamedTuple

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from open_clip.transform import CenterCropOrPad, MaybeToTensor, ResizeKeepRatio
from torchvision.io import ImageReadMode, decode_jpeg

from clip_assets.model.clip_model import ClipModel
from clip_assets.embedding.engine import _collate, _ImageFiles, decode_image, draft_size, failure_reason, too_many_pixels
from clip_assets.model.pillow_preprocess import is_rgb_conversion

log = logging.getLogger(__name__)

DECODE_PATHS = ("auto", "pillow", "tensor")
# Decoded pixels held at once while resizing: a batch of 4000x3000 photos is resized a few at a
# time rather than all at once (one 12-megapixel image is 144 MB as float32).
RESIZE_PIXELS_PER_CALL = 64_000_000
# Pixels decoded per call of the batch decoder, so a batch of large photos never holds all of them
# decoded at once (256 megapixels: 768 MB as uint8 RGB, about twenty 12-megapixel photos).
DECODE_PIXELS_PER_CALL = 256_000_000
# Files of a job that `auto` decodes both ways to choose the faster path.
MEASURE_FILES = 32
# Batches decoded ahead of the one the model encodes.
PREFETCH_BATCHES = 2

_SOF_SEQUENTIAL_HUFFMAN = (0xC0, 0xC1)  # baseline and extended sequential: what nvJPEG batch-decodes
_SOF_OTHER = (0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}


class UnsupportedTransform(ValueError):
    """The model's preprocessing holds a step with no tensor equivalent here: use the Pillow path."""


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


def _resize_keep_ratio(step: ResizeKeepRatio) -> Callable[[torch.Tensor], torch.Tensor]:
    def resize(images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        # open_clip's own size rule; it reads the size off a PIL image, so hand it one shaped alike
        size = ResizeKeepRatio.get_params(SimpleNamespace(size=(width, height)), step.size, step.longest)
        return TF.resize(images, size, step.interpolation, antialias=True)

    return resize


class TensorPreprocess:
    """The model's own eval transform, applied to decoded uint8 tensors in batches on their device.

    Built from the transform open_clip returns with the model: each geometric step (Resize,
    CenterCrop, open_clip's ResizeKeepRatio and CenterCropOrPad) keeps its own parameters and runs
    on uint8 tensors, rounding like Pillow; ToTensor and Normalize run once for the whole batch. A
    step it does not know raises `UnsupportedTransform`, so nothing is silently approximated.
    """

    def __init__(self, transform):
        steps = getattr(transform, "transforms", [transform])
        self.geometry: list[Callable[[torch.Tensor], torch.Tensor]] = []
        self.mean = self.std = None
        to_tensor_seen = False
        for step in steps:
            if isinstance(step, (T.Resize, T.CenterCrop, CenterCropOrPad)) and not to_tensor_seen:
                self.geometry.append(step)
            elif isinstance(step, ResizeKeepRatio) and not to_tensor_seen:
                self.geometry.append(_resize_keep_ratio(step))
            elif is_rgb_conversion(step):
                continue  # decoded as RGB already
            elif isinstance(step, (T.ToTensor, MaybeToTensor)):
                to_tensor_seen = True
            elif isinstance(step, T.Normalize) and to_tensor_seen and self.mean is None:
                self.mean, self.std = tuple(step.mean), tuple(step.std)
            else:
                raise UnsupportedTransform(f"no tensor equivalent for the preprocessing step {step!r}")
        if not to_tensor_seen:
            raise UnsupportedTransform("the preprocessing has no ToTensor step")

    def _geometry(self, images: torch.Tensor) -> torch.Tensor:
        for step in self.geometry:
            images = step(images)
        return images

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 (3, H, W) RGB tensors of any sizes, on one device -> normalised float32 (N, 3, h, w)."""
        out: list[torch.Tensor | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for k, image in enumerate(images):
            by_size.setdefault(tuple(image.shape[-2:]), []).append(k)
        for (height, width), members in by_size.items():
            per_call = max(1, RESIZE_PIXELS_PER_CALL // (height * width))
            for start in range(0, len(members), per_call):
                group = members[start : start + per_call]
                resized = self._geometry(torch.stack([images[k] for k in group]))
                for k, image in zip(group, resized):
                    out[k] = image
        batch = torch.stack(out).float().div_(255)
        if self.mean is not None:
            mean = torch.tensor(self.mean, device=batch.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=batch.device).view(1, -1, 1, 1)
            batch = batch.sub_(mean).div_(std)
        return batch


def decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
    """RGB uint8 (3, H, W) tensors on `device`, or the exception of each JPEG the decoder refused.

    The batch is decoded in one call (what makes nvJPEG fast); a batch call fails as a whole when
    one file is bad, so then each file is decoded alone to find it.
    """
    if not datas:
        return []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TorchCodec.*")  # torchvision 0.29's deprecation note
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except Exception:
            pass  # one bad file fails the whole call: decode them one by one to find it
        out: list[torch.Tensor | Exception] = []
        for data in datas:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except Exception as exc:  # this file falls back to Pillow
                out.append(exc)
        return out


class RawJpeg(NamedTuple):
    """A JPEG left for the batch decoder: its bytes and EXIF orientation."""

    data: bytes
    orientation: int
    pixels: int


class JpegBytesOrPixels(_ImageFiles):
    """Like the Pillow path's dataset, except that batch-decodable JPEGs come back as bytes."""

    def _pixels(self, data: bytes):
        header = sniff_jpeg(data)
        if header.batch_decodable and not too_many_pixels(header.pixels):  # a bomb fails on the Pillow path
            return RawJpeg(data, header.orientation, header.pixels)
        return super()._pixels(data)


@dataclass
class RawBatch:
    """One collated batch of the tensor path, before decoding."""

    pillow: tuple  # what the Pillow path's collate returns for the other files
    indices: list[int]
    digests: list[str]
    data: torch.Tensor  # every JPEG's bytes, end to end (one shared-memory tensor per batch)
    lengths: list[int]
    orientations: list[int]
    pixel_counts: list[int]

    def pin_memory(self) -> "RawBatch":
        """Called by the DataLoader's pinning thread: page-locked bytes copy to the GPU faster."""
        indices, digests, pixels, unchanged, failed = self.pillow
        return RawBatch(
            pillow=(indices, digests, None if pixels is None else pixels.pin_memory(), unchanged, failed),
            indices=self.indices, digests=self.digests, data=self.data.pin_memory(), lengths=self.lengths,
            orientations=self.orientations, pixel_counts=self.pixel_counts,
        )


def collate_bytes_or_pixels(items) -> RawBatch:
    raw = [(i, p, d) for i, p, d, err in items if err is None and isinstance(p, RawJpeg)]
    rest = [item for item in items if not (item[3] is None and isinstance(item[1], RawJpeg))]
    data = b"".join(p.data for _, p, _ in raw)
    return RawBatch(
        pillow=_collate(rest),
        indices=[i for i, _, _ in raw],
        digests=[d for _, _, d in raw],
        data=torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8),
        lengths=[len(p.data) for _, p, _ in raw],
        orientations=[p.orientation for _, p, _ in raw],
        pixel_counts=[p.pixels for _, p, _ in raw],
    )


def _calls(pixel_counts: list[int], budget: int) -> list[list[int]]:
    """Consecutive positions grouped so that each group decodes at most `budget` pixels (or one file)."""
    calls: list[list[int]] = []
    total = 0
    for k, count in enumerate(pixel_counts):
        if not calls or total + count > budget:
            calls.append([])
            total = 0
        calls[-1].append(k)
        total += count
    return calls


class TensorDecoder:
    """Turns collated raw batches into what the Pillow path's collate returns, pixels on the device."""

    def __init__(self, device: torch.device, preprocess, min_size: tuple[int, int] | None):
        self.device = device
        self.tensor_preprocess = TensorPreprocess(preprocess)
        self.pil_preprocess = preprocess
        self.min_size = min_size

    def pixels(self, batch: RawBatch):
        """(indices, digests, pixels on the device, unchanged, failed), as the Pillow path's collate."""
        p_indices, p_digests, p_pixels, unchanged, failed = batch.pillow
        indices, digests, parts = list(p_indices), list(p_digests), []
        if p_pixels is not None:
            parts.append(p_pixels.to(self.device, non_blocking=True))
        datas = list(torch.split(batch.data, batch.lengths)) if batch.lengths else []
        fallback = []
        for call in _calls(batch.pixel_counts, DECODE_PIXELS_PER_CALL):
            images = []
            for k, image in zip(call, decode_jpegs([datas[k] for k in call], self.device)):
                if isinstance(image, Exception):
                    fallback.append(k)
                else:
                    images.append(apply_orientation(image, batch.orientations[k]))
                    indices.append(batch.indices[k])
                    digests.append(batch.digests[k])
            if images:  # preprocessed before the next call decodes, so the full-size pixels are freed
                parts.append(self.tensor_preprocess(images))
        fallback_pixels = []
        for k in fallback:  # as on the Pillow path: decoded there, or failed with Pillow's reason
            try:
                fallback_pixels.append(self.pil_preprocess(decode_image(datas[k].numpy().tobytes(), self.min_size)))
                indices.append(batch.indices[k])
                digests.append(batch.digests[k])
            except Exception as exc:
                failed = [*failed, (batch.indices[k], failure_reason(exc))]
        if fallback_pixels:
            parts.append(torch.stack(fallback_pixels).to(self.device))
        pixels = torch.cat(parts) if parts else None
        return indices, digests, pixels, unchanged, failed


def decoded_batches(loader: Iterable[RawBatch], decoder: TensorDecoder, ahead: bool) -> Iterator[tuple]:
    """Decode each raw batch on the device; with `ahead`, in a thread working `PREFETCH_BATCHES` ahead.

    The thread needs the loader's items read in worker processes (the per-file time limit is a
    SIGALRM, which only a main thread can use), so `ahead` is for loaders with workers.
    """
    if not ahead:
        for batch in loader:
            yield decoder.pixels(batch)
        return
    cuda = decoder.device.type == "cuda"
    stream = torch.cuda.Stream(decoder.device) if cuda else None
    ready: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            if cuda and decoder.device.index is not None:
                torch.cuda.set_device(decoder.device)  # the current device is per thread (a claim may be cuda:1)
            for batch in loader:
                if cuda:
                    with torch.cuda.stream(stream):
                        result = decoder.pixels(batch)
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    result, event = decoder.pixels(batch), None
                if not put((result, event)):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(exc)

    thread = threading.Thread(target=work, name="clip-assets-tensor-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            result, event = item
            if event is not None:
                current = torch.cuda.current_stream(decoder.device)
                current.wait_event(event)
                if result[2] is not None:
                    result[2].record_stream(current)
            yield result
    finally:
        stop.set()
        thread.join(timeout=30)


def choose_decode_path(setting: str, device: torch.device, measure: Callable[[], tuple[float, float]] | None) -> tuple[str, str]:
    """('pillow' or 'tensor', why). `auto` takes the tensor path on CUDA where `measure` says it is faster.

    `measure` returns (tensor path images/s, Pillow path images/s) on a sample of the job's files.
    """
    if setting not in DECODE_PATHS:
        raise ValueError(f"CLIP_ASSETS_DECODE must be one of {', '.join(DECODE_PATHS)}, not {setting!r}")
    if setting != "auto":
        return setting, f"CLIP_ASSETS_DECODE={setting}"
    if device.type != "cuda":
        return "pillow", f"auto: the model runs on {device.type}, Pillow in parallel workers is faster there"
    if measure is None:
        return "tensor", "auto: CUDA present"
    tensor_rate, pillow_rate = measure()
    path = "tensor" if tensor_rate > pillow_rate else "pillow"
    return path, f"auto: measured {tensor_rate:,.0f} images/s decoding on {device}, {pillow_rate:,.0f} with Pillow workers"


def measure_decode_rates(files: list[bytes], decoder: TensorDecoder, workers: int) -> tuple[float, float]:
    """Images/s of the tensor path on the device and of Pillow on `workers` cores, on the same files."""
    jpegs = [f for f in files if sniff_jpeg(f).batch_decodable]
    if not jpegs:
        return 0.0, 1.0
    datas = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in jpegs]
    decoder.tensor_preprocess([d for d in decode_jpegs(datas[:2], decoder.device) if not isinstance(d, Exception)])
    sync = torch.cuda.synchronize if decoder.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    decoded = [d for d in decode_jpegs(datas, decoder.device) if not isinstance(d, Exception)]
    if decoded:
        decoder.tensor_preprocess(decoded)
    sync()
    tensor_rate = len(jpegs) / (time.perf_counter() - start)
    sample = jpegs[: max(2, len(jpegs) // 4)]
    start = time.perf_counter()
    for f in sample:
        decoder.pil_preprocess(decode_image(f, decoder.min_size))
    pillow_rate = len(sample) / (time.perf_counter() - start) * max(1, workers)
    return tensor_rate, pillow_rate


def decoder_for(setting: str, clip: ClipModel, image_root: Path, paths: list[str], workers: int,
                report: Callable[[str], None]) -> TensorDecoder | None:
    """The tensor decoder for this job, or None where the Pillow path is chosen (and reported why)."""
    try:
        decoder = TensorDecoder(clip.device, clip.preprocess, draft_size(clip))
    except UnsupportedTransform as exc:
        report(f"decoding with Pillow in the workers: {exc}")
        return None

    def measure() -> tuple[float, float]:
        sample = []
        for path in paths[:MEASURE_FILES]:
            try:
                file = image_root / path
                if stat.S_ISREG(file.stat().st_mode):  # never a FIFO or a device, which could block
                    sample.append(file.read_bytes())
            except OSError:
                continue
        return measure_decode_rates(sample, decoder, workers)

    path, why = choose_decode_path(setting, clip.device, measure)
    report(f"decoding path: {path} ({why})")
    return decoder if path == "tensor" else None
