"""Which images of a batch need encoding, and the part files that make a batch resumable.

Per usable manifest row, for the configured model:
- resumed: a part file of an interrupted run already holds it (same size and mtime);
- carried over: the previous embeddings file holds it with the same size and mtime (its rows are
  copied from that file a record batch at a time when the new file is written, never held whole);
- to encode: anything else. Where the previous file holds the image with another size or mtime,
  its content fingerprint is passed along, so a file that was only touched or copied is not
  decoded again (its bytes are read and hashed, nothing more).
Rows of images no longer in the manifest drop out. Embeddings of another model are never reused.
"""

from __future__ import annotations

import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_assets.embedding.engine import EncodeJob
from clip_assets.ingest.manifest import STATUS_OK
from clip_assets.storage.arrow_vectors import vectors_matrix
from clip_assets.storage.atomic_files import atomic_write, remove_file, remove_folder, write_parquet_atomically
from clip_assets.storage.damaged_files import (
    DAMAGED_MARKER,
    EMBEDDING_PART,
    EMBEDDINGS,
    DamagedFileError,
    parquet_batches,
)

PART_GLOB = "part-*.parquet"
_DAMAGED_COPY = re.compile(re.escape(DAMAGED_MARKER))
NORM_TOLERANCE = 1e-3


class PartFiles:
    """Chunks of an unfinished batch: `<batch>.parts/part-000001.parquet`, each renamed into place."""

    def __init__(self, directory: Path, model: str, precision: str):
        self.directory = directory
        self.model = model  # rows of another model or precision are never reused
        self.precision = precision

    def paths(self) -> list[Path]:
        return sorted(self.directory.glob(PART_GLOB)) if self.directory.is_dir() else []

    def reusable(self, table: pa.Table | pa.RecordBatch) -> pa.Array:
        """Which rows of `table` this model at this precision may reuse."""
        return pc.and_(pc.equal(table["model"], self.model), pc.equal(table["precision"], self.precision))

    @property
    def batch(self) -> str:
        return self.directory.name.removesuffix(".parts")

    def discard_other_models(self) -> None:
        """Part files of another model or precision (an interrupted run under other settings), or without
        perceptual hashes (an older version's), are removed; a damaged one is moved aside
        (clip_assets.storage.damaged_files) and its images encoded again."""
        for path in self.paths():
            try:
                with EMBEDDING_PART.reading(path, self.batch):
                    if "perceptual_hash" not in pq.read_schema(path).names:  # from before hashes were stored
                        remove_file(path)
                        continue
                    table = pq.read_table(path, columns=["model", "precision"])
            except DamagedFileError as exc:
                EMBEDDING_PART.set_aside(path, exc.reason, self.batch)
                continue
            if not pc.all(self.reusable(table)).as_py():
                remove_file(path)

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
        """The folder and its files, except the damaged copies moved aside (kept for a look)."""
        remove_folder(self.directory, keep=_DAMAGED_COPY)


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


PREVIOUS_COLUMNS = ["image_id", "model", "precision", "size", "mtime", "fingerprint", "perceptual_hash"]  # all but the vectors


@dataclass
class EncodingPlan:
    job: EncodeJob
    carried_ids: set[str]  # previous rows kept as they are (copied from the previous file by write_final)
    resumed_ids: set[str]
    keep_ids: set[str]  # every image_id the finished file may hold
    dropped: int  # previous rows whose file left the manifest
    previous_file: Path | None = None  # the file the carried rows are copied from


def previous_rows(path: Path) -> pa.Table | None:
    """The previous embeddings file's rows without their vectors; None where there is none to reuse."""
    if not path.exists():
        return None
    with EMBEDDINGS.reading(path, path.stem):
        if not {"fingerprint", "precision", "perceptual_hash"} <= set(pq.read_schema(path).names):
            return None  # written before fingerprints, recorded precisions or perceptual hashes existed: encode afresh
        return pq.read_table(path, columns=PREVIOUS_COLUMNS)


def vectors_of(path: Path, image_ids: set[str], rows_per_read: int = 65_536) -> dict[str, np.ndarray]:
    """image_id -> vector of the given images in an embeddings file, read a record batch at a time."""
    if not image_ids:
        return {}
    wanted = pa.array(sorted(image_ids), pa.string())
    out: dict[str, np.ndarray] = {}
    for record_batch in parquet_batches(path, EMBEDDINGS, path.stem, batch_size=rows_per_read,
                                        columns=["image_id", "embedding"]):
        rows = record_batch.filter(pc.is_in(record_batch.column("image_id"), wanted))
        if rows.num_rows:
            out.update(zip(rows.column("image_id").to_pylist(), vectors_matrix(rows.column("embedding")).copy()))
    return out


def plan_encoding(manifest: pa.Table, previous_file: Path | None, parts: PartFiles,
                  content_changed: set[str] = frozenset()) -> EncodingPlan:
    """What to encode, carry over and resume; the previous file's vectors are read only for the images
    whose content must be compared (never the whole file). `content_changed`: images whose bytes the
    content check found changed under an unchanged stat (clip_assets.ingest.content_check): their
    bytes are compared again, not carried."""
    previous = previous_rows(previous_file) if previous_file is not None else None
    usable = manifest.filter(pc.equal(manifest["status"], STATUS_OK))
    ids = usable["image_id"].to_pylist()
    stat = dict(zip(ids, zip(usable["size"].to_pylist(), usable["mtime"].to_pylist())))
    resumed = {i for i, s in parts.stats().items() if stat.get(i) == s}
    prev_stat: dict[str, tuple] = {}
    prev_fp: dict[str, str] = {}
    prev_hash: dict[str, int | None] = {}
    if previous is not None and previous.num_rows:
        previous = previous.filter(parts.reusable(previous))
        p_ids = previous["image_id"].to_pylist()
        prev_stat = dict(zip(p_ids, zip(previous["size"].to_pylist(), previous["mtime"].to_pylist())))
        prev_fp = dict(zip(p_ids, previous["fingerprint"].to_pylist()))
        prev_hash = dict(zip(p_ids, previous["perceptual_hash"].to_pylist()))
    carried_ids = {i for i in ids if i not in resumed and prev_stat.get(i) == stat[i] and i not in content_changed}
    todo = [k for k, i in enumerate(ids) if i not in resumed and i not in carried_ids]
    touched = {ids[k] for k in todo if ids[k] in prev_fp}
    job = EncodeJob(
        image_ids=[ids[k] for k in todo],
        paths=[usable["path"][k].as_py() for k in todo],
        sizes=[stat[ids[k]][0] for k in todo],
        mtimes=[stat[ids[k]][1] for k in todo],
        expected_fingerprints=[prev_fp.get(ids[k]) for k in todo],
        previous_vectors=vectors_of(previous_file, touched) if touched else {},
        previous_hashes={i: prev_hash.get(i) for i in touched},
    )
    return EncodingPlan(
        job=job,
        carried_ids=carried_ids,
        resumed_ids=resumed,
        keep_ids=set(ids),
        dropped=len(set(prev_stat) - set(ids)),
        previous_file=previous_file if carried_ids else None,
    )


@dataclass
class EmbeddingFileFigures:
    """What the asset checks need to know of a written embeddings file, counted as it is written."""

    rows: int = 0
    dimension: int | None = None
    nan_rows: int = 0
    off_norm_rows: int = 0  # norm not within NORM_TOLERANCE of 1 (NaN norms included)
    models: set[str] = field(default_factory=set)
    precisions: set[str] = field(default_factory=set)

    def add(self, table: pa.Table | pa.RecordBatch) -> None:
        self.dimension = table.schema.field("embedding").type.list_size
        self.rows += table.num_rows
        if not table.num_rows:
            return
        vectors = vectors_matrix(table.column("embedding"))
        self.nan_rows += int(np.isnan(vectors).any(axis=1).sum())
        norms = np.linalg.norm(vectors, axis=1)
        self.off_norm_rows += int((~(np.abs(norms - 1) <= NORM_TOLERANCE)).sum())
        self.models.update(pc.unique(table.column("model")).to_pylist())
        self.precisions.update(pc.unique(table.column("precision")).to_pylist())

    @classmethod
    def of_file(cls, path: Path, rows_per_read: int = 65_536) -> "EmbeddingFileFigures":
        """The figures of a file already written, read a record batch at a time."""
        figures = cls()
        with EMBEDDINGS.reading(path, Path(path).stem), pq.ParquetFile(path) as f:
            figures.dimension = f.schema_arrow.field("embedding").type.list_size
            for record_batch in f.iter_batches(batch_size=rows_per_read):
                figures.add(record_batch)
        return figures


def write_final(path: Path, schema: pa.Schema, plan: EncodingPlan, parts: PartFiles,
                rows_per_read: int = 16_384) -> EmbeddingFileFigures:
    """Stream part files and the carried rows of the previous file into one parquet file, each image
    once, counting the checks' figures as it goes. The previous file is read a record batch at a time
    (and replaced only when the new one is complete)."""
    seen: set[str] = set()
    figures = EmbeddingFileFigures(dimension=schema.field("embedding").type.list_size)

    def write(writer: pq.ParquetWriter, table: pa.Table, keep: list[int]) -> None:
        if keep:
            rows = table.take(keep).cast(schema)
            writer.write_table(rows)
            figures.add(rows)

    with atomic_write(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for table in parts.tables_newest_first():
            ids = table["image_id"].to_pylist()
            keep = [k for k, i in enumerate(ids) if i in plan.keep_ids and i not in seen]
            seen.update(ids[k] for k in keep)
            write(writer, table, keep)
        if plan.previous_file is not None:  # its reads only: a damaged file raises DamagedFileError
            for record_batch in parquet_batches(plan.previous_file, EMBEDDINGS, plan.previous_file.stem,
                                                batch_size=rows_per_read, columns=schema.names):
                table = pa.Table.from_batches([record_batch])
                ids = table["image_id"].to_pylist()
                reusable = parts.reusable(table).to_pylist()
                keep = [k for k, i in enumerate(ids) if i in plan.carried_ids and i not in seen and reusable[k]]
                seen.update(ids[k] for k in keep)
                write(writer, table, keep)
    return figures
