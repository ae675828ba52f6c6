"""The embedding engine: decode in parallel workers, encode in batches, write in resumable chunks.

- Decoding and the model's own preprocessing run in DataLoader workers, overlapping inference.
  A JPEG much larger than the model input is decoded at a reduced DCT scale (Pillow's `draft`),
  never below the input size, so the model's own resize does the rest.
- With the model on the CPU, torch's threads take the cores the decode workers leave, at least half
  of them, rather than all of them (see model_threads).
- Every file is read once: its bytes are fingerprinted (sha1) and decoded from memory, and the decoded
  pixels are hashed (a perceptual hash: clip_assets.embedding.perceptual_hash), both stored with the
  embedding. A file whose fingerprint matches the one stored with its previous embedding is not
  decoded again.
- One bad file never stops a batch: each failure is returned with its reason (the manifest only
  stats files, so this is where a file that is not an image, has a broken or truncated header or
  data, or has more pixels than Pillow's decompression-bomb limit is found), and each file has a
  time limit, so a file that blocks (a stalled mount, a FIFO) cannot hang a worker. A file whose
  decoder kills its worker process (a segfault or abort in native code) is found, recorded as
  failed, and the workers restart over the files not yet done (see clip_assets.embedding.decode_faults).
- Finished rows are flushed every `chunk_rows` images, or every `flush_interval_s` seconds if that
  comes first, to part files renamed into place, so a run killed at any moment resumes from the
  last completed chunk and loses at most about that many seconds of work.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import BatchSampler, DataLoader

from clip_assets.embedding.decode import draft_size
from clip_assets.embedding.decode_faults import InFlightFiles, crash_in_isolation, is_worker_death
from clip_assets.embedding.image_files import FileDigest, ImageFiles, collate, merged
from clip_assets.embedding.options import EncodeOptions
from clip_assets.model.clip_model import ClipModel, batch_size_for
from clip_assets.model.pillow_preprocess import fused_preprocess
from clip_assets.storage.store_root import StoreRoot

log = logging.getLogger(__name__)

MIN_SHARE = 8  # fewest images a decode worker collates at once
WORKER_DEATH_WAIT_S = 2.0  # how long an odd loader error waits for a worker's death to show

FAILURES_SCHEMA = pa.schema(
    [pa.field("image_id", pa.string()), pa.field("path", pa.string()), pa.field("error", pa.string())]
)


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            # How the image tower computed it (clip_assets.model.clip_model.PRECISIONS, resolved): a batch
            # never mixes precisions, rows of another are encoded again like another model's.
            pa.field("precision", pa.string(), nullable=False),
            # What the embedding was computed from: stat for the fast path, content for the truth.
            pa.field("size", pa.int64()),
            pa.field("mtime", pa.float64()),
            pa.field("fingerprint", pa.string()),
            # pHash of the decoded pixels (clip_assets.embedding.perceptual_hash): confirms copies among
            # near-duplicates; null where unknown
            pa.field("perceptual_hash", pa.int64()),
        ]
    )


def default_num_workers() -> int:
    return max(1, min(16, os.cpu_count() or 2))


def decode_workers(num_workers: int, images: int, batch_size: int) -> int:
    """Decode processes for a job: as configured (-1: from the core count), no more than it has batches.

    0 decodes in the calling process, where a decoder that crashes takes the run down with it; with
    one worker or more, a crash costs only the file that caused it.
    """
    workers = default_num_workers() if num_workers < 0 else num_workers
    return min(workers, math.ceil(images / batch_size))


def model_threads(workers: int) -> int:
    """torch threads for a model on the CPU beside `workers` decode processes: the cores they leave,
    but at least half of the cores (rounded up).

    With a thread per core beside the workers, torch's threads spin waiting for one another whenever
    a worker holds a core: on 2 cores, ViT-S-32 beside 2 workers cost 57 ms of CPU per image with 2
    threads, 41 ms with 1. Workers beyond the cores the threads leave cost little (they sleep once
    they are ahead of the model) and take up a core's slack when decoding is the slower half: on 2
    cores, int8 ViT-S-32 beside 2 workers and 1 thread ran about 7% faster than beside 1 worker
    (benchmarks/embed_throughput.py)."""
    cores = os.cpu_count() or 1
    return max(1, cores - workers, -(-cores // 2))


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` (None: unchanged) for the block, then as they were."""
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@dataclass(frozen=True)
class EncodeJob:
    """The images still to encode, with what is known about each from the manifest."""

    image_ids: list[str]
    paths: list[str]
    sizes: list[int | None]
    mtimes: list[float | None]
    expected_fingerprints: list[str | None]  # from the previous embedding, to skip unchanged content
    previous_vectors: dict[str, np.ndarray]  # image_id -> vector, for content-unchanged files
    previous_hashes: dict[str, int | None] = field(default_factory=dict)  # image_id -> perceptual hash, the same


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
        first = self.done == 0 and n > 0
        self.done += n
        now = time.monotonic()
        if first:  # the run log then shows what starting the decode workers cost
            self.report(f"first {n:,} images done {now - self.started:.1f} s after encoding began")
        if now - self.last >= self.every_s:
            rate = self.done / (now - self.started)
            eta = (self.total - self.done) / rate if rate else float("inf")
            self.report(f"embedded {self.done:,}/{self.total:,} images, {rate:,.1f} images/s, ETA {eta:,.0f} s")
            self.last = now


def encode_images(
    clip: ClipModel,
    image_root: Path | StoreRoot,
    job: EncodeJob,
    write_chunk: Callable[[pa.Table], None],
    options: EncodeOptions = EncodeOptions(),
    report: Callable[[str], None] = log.info,
) -> EncodeResult:
    """Encode every image of `job`, handing finished rows to `write_chunk` every `options.chunk_rows`,
    or after `options.flush_interval_s` seconds of work if that comes first (a slow model on a CPU).

    When a decode worker dies, the file it was reading is decoded again in a process of its own;
    if that crashes too, the file is recorded as failed with how the process ended, and new workers
    take up the files not yet done. Rows already encoded are kept.

    `options.decode`: "pillow" (workers decode and preprocess), "tensor" (JPEGs batch-decoded on the
    model's device, see tensor_decode.py) or "auto" (tensor on CUDA where it measures faster).
    """
    result = EncodeResult(failures=[])
    n = len(job.image_ids)
    if not n:
        return result
    batch_size = batch_size_for(clip, options.batch_size)
    model_on_cpu = clip.device.type == "cpu"
    workers = decode_workers(options.num_workers, n, batch_size)
    shares = max(1, min(workers, batch_size // MIN_SHARE))
    in_flight = InFlightFiles(workers)
    decoder = None
    if options.decode != "pillow":
        # not at the top: it imports open_clip and torchvision, which the Pillow path (and the Dagster
        # code location, which imports this module) need not load
        from clip_assets.embedding import tensor_decode

        decoder = tensor_decode.decoder_for(options.decode, clip, image_root, job.paths, workers, report)
    dataset_type, collate_fn = (
        (tensor_decode.JpegBytesOrPixels, tensor_decode.collate_bytes_or_pixels) if decoder else (ImageFiles, collate)
    )
    dataset = dataset_type(
        image_root, job.paths, job.expected_fingerprints, fused_preprocess(clip.preprocess), draft_size(clip),
        options.file_timeout_s, in_flight,
    )
    schema = embeddings_schema(clip.embed_dim)
    # torch reports a dead worker from its SIGCHLD handler, i.e. in whatever code the main thread is
    # running. So rows go into `pending` first and are marked done after: an interruption anywhere
    # can make a file be read twice (the batch file keeps one row per image), never lose it.
    pending: list[tuple[list[int], np.ndarray, list[str]]] = []
    encoded = np.zeros(n, dtype=bool)
    unchanged_content = np.zeros(n, dtype=bool)
    failures: dict[int, str] = {}
    progress = Progress(n, report)

    last_flush = time.monotonic()

    def flush():
        nonlocal pending, last_flush
        last_flush = time.monotonic()
        if not pending:
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
                    "precision": [clip.computed_precision] * len(idx),
                    "size": [job.sizes[i] for i in idx],
                    "mtime": [job.mtimes[i] for i in idx],
                    "fingerprint": [d.fingerprint for _, _, digests in pending for d in digests],
                    "perceptual_hash": [d.perceptual_hash for _, _, digests in pending for d in digests],
                },
                schema=schema,
            )
        )
        pending = []

    def done() -> np.ndarray:
        mask = encoded | unchanged_content
        mask[list(failures)] = True
        return mask

    with torch_threads(model_threads(workers) if model_on_cpu else None):
        remaining = list(range(n))
        done_at_last_crash = -1
        while remaining:
            in_flight.clear()
            batches = iter(
                DataLoader(
                    dataset,
                    # A worker collates a whole loader batch alone, so each model batch is cut into one
                    # share per worker: the first images are ready when every worker has decoded its
                    # share, not when one worker has decoded the whole batch.
                    batch_sampler=BatchSampler(remaining, -(-batch_size // shares), drop_last=False),
                    num_workers=workers,
                    collate_fn=collate_fn,
                    pin_memory=clip.device.type == "cuda",
                    # Forked workers start at once with everything imported. The default start method is
                    # the parent's: under `forkserver` or `spawn` every worker would import torch and this
                    # package afresh (seconds each, before the first image).
                    multiprocessing_context="fork" if workers and "fork" in multiprocessing.get_all_start_methods() else None,
                )
            )
            decoded = tensor_decode.decoded_batches(batches, decoder, ahead=workers > 0) if decoder else batches
            try:
                for indices, digests, pixels, unchanged, failed in merged(decoded, shares):
                    if pixels is not None:
                        pending.append((indices, clip.encode_image_tensors(pixels).numpy(), digests))
                        encoded[indices] = True
                    if unchanged:
                        ids = [i for i, _ in unchanged]
                        vectors = np.stack([job.previous_vectors[job.image_ids[i]] for i in ids])
                        pending.append((ids, vectors, [FileDigest(d.fingerprint, job.previous_hashes.get(job.image_ids[i]))
                                                       for i, d in unchanged]))
                        unchanged_content[ids] = True
                    failures.update(failed)
                    progress.add(len(indices) + len(unchanged) + len(failed))
                    if pending and (
                        sum(len(chunk) for chunk, _, _ in pending) >= options.chunk_rows
                        or time.monotonic() - last_flush >= options.flush_interval_s
                    ):
                        flush()
                break
            except Exception as exc:
                death = worker_death(exc, batches)
                if death is None:
                    raise
                exc = death
                _stop_workers(batches)
                finished = done()
                culprits = {
                    i: reason
                    for i in in_flight.held()
                    if not finished[i] and (reason := crash_in_isolation(dataset, i, options.file_timeout_s))
                }
                if not culprits and int(finished.sum()) == done_at_last_crash:
                    flush()  # what was done stays in part files for the next run
                    suspects = ", ".join(job.paths[i] for i in in_flight.held() if not finished[i]) or "none"
                    raise RuntimeError(
                        f"Decode workers keep dying ({exc}) and no file can be blamed: the files they were "
                        f"reading ({suspects}) decode without a crash on their own, and nothing was done between "
                        "the last two deaths. Move those files aside, or if the machine is short of memory, use "
                        "fewer workers (CLIP_ASSETS_NUM_WORKERS)."
                    ) from exc
                done_at_last_crash = int(finished.sum())
                failures.update(culprits)
                for i, reason in culprits.items():
                    report(f"{job.paths[i]}: {reason}; recorded as failed")
                remaining = np.flatnonzero(~done()).tolist()
                report(f"a decode worker died ({exc}); new workers take up the {len(remaining):,} images not done yet")
    flush()
    result.encoded = int(encoded.sum())
    result.unchanged_content = int(unchanged_content.sum())
    result.failures = [(job.image_ids[i], job.paths[i], reason) for i, reason in sorted(failures.items())]
    return result


def worker_death(exc: Exception, batches) -> Exception | None:
    """`exc` (or torch's own report that follows it) when a decode worker died, else None.

    A worker that dies while its batch is being handed over shows first as that handover failing
    (a reset connection or a truncated pipe while the main process unpickles shared memory); torch
    names the dead worker only once the process is reaped, from its SIGCHLD handler, which may
    raise while this looks.
    """
    if is_worker_death(exc):
        return exc
    workers = getattr(batches, "_workers", None)
    if not workers:
        return None
    try:
        deadline = time.monotonic() + WORKER_DEATH_WAIT_S
        while True:
            if any(not w.is_alive() for w in workers):
                return exc
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
    except RuntimeError as report:
        if is_worker_death(report):
            return report
        raise


def _stop_workers(batches) -> None:
    """Shut a loader's workers down now, after one died.

    torch would do it when the iterator is collected, which the exception's traceback delays. While
    it does, torch may report the dead worker once more.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:
        return
    try:
        shutdown()
    except RuntimeError as exc:
        if not is_worker_death(exc):
            raise

