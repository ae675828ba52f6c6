"""Which images of a batch need encoding, and the part files that make a batch resumable.

Per usable manifest row, for the configured model:
- resumed: a part file of an interrupted run already holds it (same size and mtime);
- carried over: the previous embeddings file holds it with the same size and mtime;
- to encode: anything else. Where the previous file holds the image with another size or mtime,
  its content fingerprint is passed along, so a file that was only touched or copied is not
  decoded again (its bytes are read and hashed, nothing more).
Rows of images no longer in the manifest drop out. Embeddings of another model are never reused.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_assets.atomic_files import atomic_write, write_parquet_atomically
from clip_assets.embedding import EncodeJob, embeddings_matrix, iter_slices
from clip_assets.manifest import STATUS_OK

PART_GLOB = "part-*.parquet"


class PartFiles:
    """Chunks of an unfinished batch: `<batch>.parts/part-000001.parquet`, each renamed into place."""

    def __init__(self, directory: Path, model: str):
        self.directory = directory
        self.model = model

    def paths(self) -> list[Path]:
        return sorted(self.directory.glob(PART_GLOB)) if self.directory.is_dir() else []

    def discard_other_models(self) -> None:
        for path in self.paths():
            models = set(pq.read_table(path, columns=["model"])["model"].unique().to_pylist())
            if models != {self.model}:
                path.unlink()

    def write(self, table: pa.Table) -> None:
        existing = self.paths()
        number = int(existing[-1].stem.split("-")[1]) + 1 if existing else 1
        write_parquet_atomically(table, self.directory / f"part-{number:06d}.parquet")

    def stats(self) -> dict[str, tuple[int | None, float | None]]:
        """image_id -> (size, mtime) of every row already in a part file (the newest wins)."""
        out: dict[str, tuple[int | None, float | None]] = {}
        for path in self.paths():
            t = pq.read_table(path, columns=["image_id", "size", "mtime"])
            out.update(zip(t["image_id"].to_pylist(), zip(t["size"].to_pylist(), t["mtime"].to_pylist())))
        return out

    def tables_newest_first(self) -> Iterator[pa.Table]:
        for path in reversed(self.paths()):
            yield pq.read_table(path)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class BackgroundWrites:
    """Hands each chunk to a writer thread, so the model keeps encoding while parquet is written.

    One write at a time and in order (the next waits for the previous), so part files keep their
    numbering and a killed run still resumes from the last file renamed into place. A write's error
    is raised at the next write or when the block ends.
    """

    def __init__(self, write: Callable[[pa.Table], None]):
        self._write = write
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-assets-parquet")
        self._pending: Future | None = None

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __call__(self, table: pa.Table) -> None:
        self._wait()
        self._pending = self._pool.submit(self._write, table)

    def __enter__(self) -> "BackgroundWrites":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._wait()
            elif self._pending is not None:
                self._pending.exception()  # let it finish; the error already in flight wins
        finally:
            self._pool.shutdown(wait=True)


@dataclass
class EncodingPlan:
    job: EncodeJob
    carried: pa.Table  # previous rows kept as they are
    resumed_ids: set[str]
    keep_ids: set[str]  # every image_id the finished file may hold
    dropped: int  # previous rows whose file left the manifest


def plan_encoding(manifest: pa.Table, previous: pa.Table | None, parts: PartFiles) -> EncodingPlan:
    usable = manifest.filter(pc.equal(manifest["status"], STATUS_OK))
    ids = usable["image_id"].to_pylist()
    stat = dict(zip(ids, zip(usable["size"].to_pylist(), usable["mtime"].to_pylist())))
    resumed = {i for i, s in parts.stats().items() if stat.get(i) == s}
    prev_stat: dict[str, tuple] = {}
    prev_fp: dict[str, str] = {}
    if previous is not None and previous.num_rows:
        previous = previous.filter(pc.equal(previous["model"], parts.model))
        p_ids = previous["image_id"].to_pylist()
        prev_stat = dict(zip(p_ids, zip(previous["size"].to_pylist(), previous["mtime"].to_pylist())))
        prev_fp = dict(zip(p_ids, previous["fingerprint"].to_pylist()))
    carried_ids = {i for i in ids if i not in resumed and prev_stat.get(i) == stat[i]}
    todo = [k for k, i in enumerate(ids) if i not in resumed and i not in carried_ids]
    touched = [ids[k] for k in todo if ids[k] in prev_fp]
    previous_vectors: dict[str, np.ndarray] = {}
    if touched:
        rows = previous.filter(pc.is_in(previous["image_id"], pa.array(touched)))
        previous_vectors = dict(zip(rows["image_id"].to_pylist(), embeddings_matrix(rows)))
    carried = (
        previous.filter(pc.is_in(previous["image_id"], pa.array(sorted(carried_ids), pa.string())))
        if previous is not None and carried_ids
        else None
    )
    job = EncodeJob(
        image_ids=[ids[k] for k in todo],
        paths=[usable["path"][k].as_py() for k in todo],
        sizes=[stat[ids[k]][0] for k in todo],
        mtimes=[stat[ids[k]][1] for k in todo],
        expected_fingerprints=[prev_fp.get(ids[k]) for k in todo],
        previous_vectors=previous_vectors,
    )
    return EncodingPlan(
        job=job,
        carried=carried,
        resumed_ids=resumed,
        keep_ids=set(ids),
        dropped=len(set(prev_stat) - set(ids)),
    )


def write_final(path: Path, schema: pa.Schema, plan: EncodingPlan, parts: PartFiles, slice_rows: int = 16384) -> int:
    """Stream carried rows and part files into one parquet file, each image once; returns rows."""
    seen: set[str] = set()
    rows = 0
    with atomic_write(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for table in parts.tables_newest_first():
            ids = table["image_id"].to_pylist()
            keep = [k for k, i in enumerate(ids) if i in plan.keep_ids and i not in seen]
            seen.update(ids[k] for k in keep)
            if keep:
                writer.write_table(table.take(keep).cast(schema))
                rows += len(keep)
        if plan.carried is not None:
            for part in iter_slices(plan.carried, slice_rows):
                ids = part["image_id"].to_pylist()
                keep = [k for k, i in enumerate(ids) if i not in seen]
                if keep:
                    writer.write_table(part.take(keep).cast(schema))
                    rows += len(keep)
    return rows
