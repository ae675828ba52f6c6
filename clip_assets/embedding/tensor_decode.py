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
from typing import Callable, Iterable, Iterator, NamedTuple

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from clip_assets.embedding.decode import decode_image, draft_size, failure_reason, too_many_pixels
from clip_assets.embedding.image_files import FileDigest, ImageFiles, collate
from clip_assets.embedding.jpeg_header import apply_orientation, sniff_jpeg
from clip_assets.embedding.perceptual_hash import perceptual_hash, tensor_hashes
from clip_assets.embedding.tensor_preprocess import TensorPreprocess, UnsupportedTransform
from clip_assets.model.clip_model import ClipModel
from clip_assets.storage.store_root import StoreRoot
from clip_assets.storage.store_urls import StoreError

log = logging.getLogger(__name__)

DECODE_PATHS = ("auto", "pillow", "tensor")
# Pixels decoded per call of the batch decoder, so a batch of large photos never holds all of them
# decoded at once (256 megapixels: 768 MB as uint8 RGB, about twenty 12-megapixel photos).
DECODE_PIXELS_PER_CALL = 256_000_000
# Files of a job that `auto` decodes both ways to choose the faster path.
MEASURE_FILES = 32
# Batches decoded ahead of the one the model encodes.
PREFETCH_BATCHES = 2


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


class JpegBytesOrPixels(ImageFiles):
    """Like the Pillow path's dataset, except that batch-decodable JPEGs come back as bytes."""

    def _pixels(self, data: bytes):
        header = sniff_jpeg(data)
        if header.batch_decodable and not too_many_pixels(header.pixels):  # a bomb fails on the Pillow path
            return RawJpeg(data, header.orientation, header.pixels), None  # hashed once decoded on the device
        return super()._pixels(data)


@dataclass
class RawBatch:
    """One collated batch of the tensor path, before decoding."""

    pillow: tuple  # what the Pillow path's collate returns for the other files
    indices: list[int]
    digests: list[FileDigest]
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
        pillow=collate(rest),
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
            images, decoded = [], []
            for k, image in zip(call, decode_jpegs([datas[k] for k in call], self.device)):
                if isinstance(image, Exception):
                    fallback.append(k)
                else:
                    images.append(apply_orientation(image, batch.orientations[k]))
                    decoded.append(k)
                    indices.append(batch.indices[k])
            if images:  # hashed and preprocessed before the next call decodes, so the full-size pixels are freed
                digests += [FileDigest(batch.digests[k].fingerprint, h) for k, h in zip(decoded, tensor_hashes(images))]
                parts.append(self.tensor_preprocess(images))
        fallback_pixels = []
        for k in fallback:  # as on the Pillow path: decoded there, or failed with Pillow's reason
            try:
                image = decode_image(datas[k].numpy().tobytes(), self.min_size)
                fallback_pixels.append(self.pil_preprocess(image))
                indices.append(batch.indices[k])
                digests.append(FileDigest(batch.digests[k].fingerprint, perceptual_hash(image)))
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


def decoder_for(setting: str, clip: ClipModel, image_root: Path | StoreRoot, paths: list[str], workers: int,
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
                if isinstance(image_root, StoreRoot):
                    sample.append(image_root.read_bytes(path))
                    continue
                file = image_root / path
                if stat.S_ISREG(file.stat().st_mode):  # never a FIFO or a device, which could block
                    sample.append(file.read_bytes())
            except (OSError, StoreError):
                continue
        return measure_decode_rates(sample, decoder, workers)

    path, why = choose_decode_path(setting, clip.device, measure)
    report(f"decoding path: {path} ({why})")
    return decoder if path == "tensor" else None
