"""What the embedding engine's DataLoader workers run on the Pillow path: each file read once,
fingerprinted, skipped when its content is unchanged, else decoded, hashed (its perceptual hash, from
the pixels decoded for the model) and preprocessed, never raising; and the collation of their results
into batches (the tensor decode path builds on both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from torch.utils.data import Dataset

from clip_assets.embedding.decode import decode_image, failure_reason, fingerprint
from clip_assets.embedding.decode_faults import InFlightFiles, call_with_time_limit
from clip_assets.embedding.perceptual_hash import perceptual_hash
from clip_assets.storage.store_root import StoreRoot, read_file_bytes

UNCHANGED = "unchanged"


class FileDigest(NamedTuple):
    """What is known of a file's content besides its pixels: the fingerprint of its bytes, and its
    perceptual hash (None until its pixels are decoded: a file the tensor path decodes on the device,
    or one whose content is unchanged, whose hash is the stored one)."""

    fingerprint: str
    perceptual_hash: int | None = None


class ImageFiles(Dataset):
    """Reads, fingerprints, decodes and preprocesses one file; never raises.

    `in_flight` records, for a decode worker, the file it is reading, so a worker that dies on a
    file leaves its index behind. With the image root in an object store, a worker's share of files is
    fetched a few objects at a time (`__getitems__`), so decoding does not wait on one request after another.
    """

    def __init__(self, image_root: Path | StoreRoot, paths: list[str], expected: list[str | None], preprocess,
                 min_size: tuple[int, int] | None, timeout_s: float | None, in_flight: InFlightFiles | None = None):
        self.image_root = image_root
        self.paths = paths
        self.expected = expected
        self.preprocess = preprocess
        self.min_size = min_size
        self.timeout_s = timeout_s
        self.in_flight = in_flight or InFlightFiles(0)

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, index: int, data: bytes | None = None):
        if data is None:
            data = read_file_bytes(self.image_root, self.paths[index])
        digest = fingerprint(data)
        if digest == self.expected[index]:
            return None, FileDigest(digest), UNCHANGED
        if not data:
            raise ValueError("empty file")
        pixels, phash = self._pixels(data)
        return pixels, FileDigest(digest, phash), None

    def __getitem__(self, index: int, data: bytes | BaseException | None = None):
        self.in_flight.start(index)
        try:
            if isinstance(data, BaseException):  # the object could not be fetched
                raise data
            return (index, *call_with_time_limit(lambda: self._read(index, data), self.timeout_s))
        except Exception as exc:  # one bad file must not stop the batch
            return index, None, None, failure_reason(exc)
        finally:
            self.in_flight.finish()

    def __getitems__(self, indices: list[int]) -> list:
        """The items of a DataLoader batch; from a store, their objects fetched concurrently first (each
        waited for at most the file's time limit, then decoded within it)."""
        if not isinstance(self.image_root, StoreRoot):
            return [self[i] for i in indices]
        fetched = self.image_root.read_many([self.paths[i] for i in indices], self.timeout_s)
        return [self.__getitem__(i, data) for i, data in zip(indices, fetched)]

    def _pixels(self, data: bytes):
        """(the model's pixels, the perceptual hash), or (what the tensor path decodes later, None)."""
        image = decode_image(data, self.min_size)
        return self.preprocess(image), perceptual_hash(image)


def collate(items):
    ok = [(i, p, d) for i, p, d, err in items if err is None]
    unchanged = [(i, d) for i, _, d, err in items if err == UNCHANGED]
    failed = [(i, err) for i, _, _, err in items if err not in (None, UNCHANGED)]
    pixels = torch.stack([p for _, p, _ in ok]) if ok else None
    return [i for i, _, _ in ok], [d for _, _, d in ok], pixels, unchanged, failed


def merged(batches: Iterator[tuple], n: int) -> Iterator[tuple]:
    """Every `n` collated shares as one batch: (indices, digests, pixels, unchanged, failed)."""
    group: list[tuple] = []
    for batch in batches:
        group.append(batch)
        if len(group) == n:
            yield _merge(group)
            group = []
    if group:
        yield _merge(group)


def _merge(group: list[tuple]) -> tuple:
    if len(group) == 1:
        return group[0]
    pixels = [g[2] for g in group if g[2] is not None]
    return ([i for g in group for i in g[0]], [d for g in group for d in g[1]], torch.cat(pixels) if pixels else None,
            [u for g in group for u in g[3]], [f for g in group for f in g[4]])
