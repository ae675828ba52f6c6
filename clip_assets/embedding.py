"""The embedding engine: decode in parallel workers, encode in batches, write in resumable chunks.

- Decoding and the model's own preprocessing run in DataLoader workers, overlapping inference.
  A JPEG much larger than the model input is decoded at a reduced DCT scale (Pillow's `draft`),
  never below the input size, so the model's own resize does the rest.
- Every file is read once: its bytes are fingerprinted (sha1) and decoded from memory. A file whose
  fingerprint matches the one stored with its previous embedding is not decoded again.
- One bad file never stops a batch: each failure is returned with its reason, and each file has a
  time limit, so a file that blocks (a stalled mount, a FIFO) cannot hang a worker.
- Finished rows are flushed every `chunk_rows` images to part files renamed into place, so a run
  killed at any moment resumes from the last completed chunk.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from clip_assets.clip_model import ClipModel

log = logging.getLogger(__name__)

DEFAULT_FILE_TIMEOUT_S = 60.0
# JPEGs are decoded at the smallest DCT scale covering twice the model input: the model's resize
# then works from a sharper image (mean pixel error vs full decoding ~0.003 on ViT-B-32, well
# under the 0.08-0.19 by which bilinear and bicubic resizing differ; see the tests).
DRAFT_OVERSAMPLE = 2
DEFAULT_CHUNK_ROWS = 4096

FAILURES_SCHEMA = pa.schema(
    [pa.field("image_id", pa.string()), pa.field("path", pa.string()), pa.field("error", pa.string())]
)


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            # What the embedding was computed from: stat for the fast path, content for the truth.
            pa.field("size", pa.int64()),
            pa.field("mtime", pa.float64()),
            pa.field("fingerprint", pa.string()),
        ]
    )


class FileTimeout(TimeoutError):
    pass


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise FileTimeout if the block runs longer than `seconds` (main thread of a process only)."""
    if not seconds:
        yield
        return

    def _expired(signum, frame):
        raise FileTimeout(f"gave up after {seconds:g} s (file blocked or too slow to decode)")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


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


def decode_image(data: bytes, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode from memory the way the model should see it: first frame, EXIF orientation, RGB.

    With `min_size` (the model's input width and height), a JPEG is decoded at the smallest DCT
    scale that still covers it in both dimensions.
    """
    with Image.open(io.BytesIO(data)) as img:
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


UNCHANGED = "unchanged"


class _ImageFiles(Dataset):
    """Reads, fingerprints, decodes and preprocesses one file; never raises."""

    def __init__(self, image_root: Path, paths: list[str], expected: list[str | None], preprocess,
                 min_size: tuple[int, int] | None, timeout_s: float | None):
        self.image_root = image_root
        self.paths = paths
        self.expected = expected
        self.preprocess = preprocess
        self.min_size = min_size
        self.timeout_s = timeout_s

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            with time_limit(self.timeout_s):
                data = (self.image_root / self.paths[index]).read_bytes()
                digest = fingerprint(data)
                if digest == self.expected[index]:
                    return index, None, digest, UNCHANGED
                if not data:
                    raise ValueError("empty file")
                pixels = self.preprocess(decode_image(data, self.min_size))
            return index, pixels, digest, None
        except Exception as exc:  # one bad file must not stop the batch
            return index, None, None, f"{type(exc).__name__}: {exc}"


def _collate(items):
    ok = [(i, p, d) for i, p, d, err in items if err is None]
    unchanged = [(i, d) for i, _, d, err in items if err == UNCHANGED]
    failed = [(i, err) for i, _, _, err in items if err not in (None, UNCHANGED)]
    pixels = torch.stack([p for _, p, _ in ok]) if ok else None
    return [i for i, _, _ in ok], [d for _, _, d in ok], pixels, unchanged, failed


def default_num_workers() -> int:
    return max(1, min(16, os.cpu_count() or 2))


@dataclass(frozen=True)
class EncodeJob:
    """The images still to encode, with what is known about each from the manifest."""

    image_ids: list[str]
    paths: list[str]
    sizes: list[int | None]
    mtimes: list[float | None]
    expected_fingerprints: list[str | None]  # from the previous embedding, to skip unchanged content
    previous_vectors: dict[str, np.ndarray]  # image_id -> vector, for content-unchanged files


@dataclass
class EncodeResult:
    encoded: int = 0
    unchanged_content: int = 0
    failures: list[tuple[str, str, str]] | None = None  # (image_id, path, reason)


class Progress:
    """Images done, images/s and ETA, every `every_s` seconds rather than every image."""

    def __init__(self, total: int, report: Callable[[str], None], every_s: float = 5.0):
        self.total, self.report, self.every_s = total, report, every_s
        self.done = 0
        self.started = self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            rate = self.done / (now - self.started)
            eta = (self.total - self.done) / rate if rate else float("inf")
            self.report(f"embedded {self.done:,}/{self.total:,} images, {rate:,.1f} images/s, ETA {eta:,.0f} s")
            self.last = now


def encode_images(
    clip: ClipModel,
    image_root: Path,
    job: EncodeJob,
    write_chunk: Callable[[pa.Table], None],
    batch_size: int = 64,
    num_workers: int = -1,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    timeout_s: float | None = DEFAULT_FILE_TIMEOUT_S,
    report: Callable[[str], None] = log.info,
) -> EncodeResult:
    """Encode every image of `job`, handing finished rows to `write_chunk` every `chunk_rows`."""
    result = EncodeResult(failures=[])
    if not job.image_ids:
        return result
    workers = default_num_workers() if num_workers < 0 else num_workers
    loader = DataLoader(
        _ImageFiles(image_root, job.paths, job.expected_fingerprints, clip.preprocess, draft_size(clip), timeout_s),
        batch_size=batch_size,
        num_workers=workers if len(job.paths) > batch_size else 0,
        collate_fn=_collate,
        pin_memory=clip.device.type == "cuda",
        persistent_workers=False,
    )
    schema = embeddings_schema(clip.embed_dim)
    pending: list[tuple[list[int], np.ndarray, list[str]]] = []
    pending_rows = 0
    progress = Progress(len(job.paths), report)

    def flush():
        nonlocal pending, pending_rows
        if not pending_rows:
            return
        idx = [i for chunk, _, _ in pending for i in chunk]
        write_chunk(
            pa.table(
                {
                    "image_id": [job.image_ids[i] for i in idx],
                    "embedding": pa.FixedSizeListArray.from_arrays(
                        pa.array(np.concatenate([v for _, v, _ in pending]).reshape(-1), pa.float32()), clip.embed_dim
                    ),
                    "model": [clip.identity] * len(idx),
                    "size": [job.sizes[i] for i in idx],
                    "mtime": [job.mtimes[i] for i in idx],
                    "fingerprint": [d for _, _, digests in pending for d in digests],
                },
                schema=schema,
            )
        )
        pending, pending_rows = [], 0

    for indices, digests, pixels, unchanged, failed in loader:
        if pixels is not None:
            pending.append((indices, clip.encode_image_tensors(pixels).numpy(), digests))
            pending_rows += len(indices)
            result.encoded += len(indices)
        if unchanged:
            vectors = np.stack([job.previous_vectors[job.image_ids[i]] for i, _ in unchanged])
            pending.append(([i for i, _ in unchanged], vectors, [d for _, d in unchanged]))
            pending_rows += len(unchanged)
            result.unchanged_content += len(unchanged)
        result.failures.extend((job.image_ids[i], job.paths[i], err) for i, err in failed)
        progress.add(len(indices) + len(unchanged) + len(failed))
        if pending_rows >= chunk_rows:
            flush()
    flush()
    return result


def embeddings_matrix(table: pa.Table) -> np.ndarray:
    """The `embedding` column as an (n, dim) float32 array, without a Python loop."""
    column = table["embedding"].combine_chunks()
    if len(column) == 0:
        return np.empty((0, column.type.list_size), dtype=np.float32)
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def iter_slices(table: pa.Table, rows: int) -> Iterator[pa.Table]:
    for start in range(0, table.num_rows, rows):
        yield table.slice(start, rows)
