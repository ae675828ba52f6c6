"""The search rows: a plain float32 copy of each embeddings file, read through mmap.

Parquet stores a fixed-size list column with per-value levels, and decoding those costs about a
second per 100,000 embeddings of dimension 512: too slow for an interactive query over millions.
So the first search after a batch's embeddings change copies them, streaming, into
search_index/<batch>.f32 (row-major float32, same row order as the parquet file; the folder keeps
its older name) with a small JSON note of the parquet file it was made from. Later queries map that
file and multiply it a chunk at a time, handing each chunk's pages back afterwards, so the process's
memory stays bounded. The parquet file stays the source of truth: rows whose note does not match it
are rebuilt, and so are rows changed after their note was written (cut short, emptied or overwritten:
the note holds the rows file's own size and mtime) and rows whose note is damaged. Exact search
scores these rows; the approximate index (clip_assets.search.ann_index, the `image_search_index`
asset) re-ranks its candidates from them.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from clip_assets.config.layout import DataLayout
from clip_assets.storage.arrow_vectors import vectors_matrix
from clip_assets.storage.atomic_files import atomic_write, write_text_atomically
from clip_assets.storage.damaged_files import EMBEDDINGS, open_parquet, parquet_batches

DEFAULT_RECORD_BATCH_ROWS = 65_536  # 128 MiB of float32 at dimension 512


@dataclass(frozen=True)
class SearchRowsFile:
    path: Path
    rows: int
    dim: int


def rows_path(embeddings_file: Path) -> Path:
    return DataLayout.of_embeddings_file(embeddings_file).search_rows_path(embeddings_file.stem)


def note_path(embeddings_file: Path) -> Path:
    return DataLayout.of_embeddings_file(embeddings_file).search_rows_note_path(embeddings_file.stem)


def source_note(embeddings_file: Path) -> dict:
    st = embeddings_file.stat()
    return {"source": embeddings_file.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fresh_search_rows(embeddings_file: Path) -> SearchRowsFile | None:
    """The search rows of one embeddings file when they are written and match the file as it is now, else None."""
    data = rows_path(embeddings_file)
    note_file = note_path(embeddings_file)
    if note_file.is_file() and data.is_file():
        source = source_note(embeddings_file)
        try:
            note = json.loads(note_file.read_text())
            rows, dim = int(note["rows"]), int(note["dim"])
            st = data.stat()
            if ({k: note.get(k) for k in source} == source and st.st_size == rows * dim * 4
                    and note.get("rows_mtime_ns") == st.st_mtime_ns):
                return SearchRowsFile(data, rows, dim)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # an emptied or damaged note: the rows are stale, rebuilt from the parquet file
    return None


def ensure_search_rows(embeddings_file: Path, record_batch_rows: int = DEFAULT_RECORD_BATCH_ROWS) -> SearchRowsFile:
    """The search rows of one embeddings file, (re)built from the parquet file when missing or stale."""
    found = fresh_search_rows(embeddings_file)
    if found is not None:
        return found
    data = rows_path(embeddings_file)
    note_file = note_path(embeddings_file)
    source = source_note(embeddings_file)
    with open_parquet(embeddings_file, EMBEDDINGS, embeddings_file.stem) as pf:
        dim = pf.schema_arrow.field("embedding").type.list_size
    rows = 0
    with atomic_write(data) as tmp, open(tmp, "wb") as out:
        for rb in parquet_batches(embeddings_file, EMBEDDINGS, embeddings_file.stem, batch_size=record_batch_rows,
                                  columns=["embedding"]):
            matrix = np.ascontiguousarray(vectors_matrix(rb.column("embedding")), dtype=np.float32)
            out.write(matrix.tobytes())
            rows += len(matrix)
    write_text_atomically(json.dumps({**source, "rows": rows, "dim": dim, "rows_mtime_ns": data.stat().st_mtime_ns}),
                          note_file)
    return SearchRowsFile(data, rows, dim)


def mapped_rows(found: SearchRowsFile) -> np.ndarray:
    """The rows as a read-only (rows, dim) float32 memmap (an empty array when there are none)."""
    if not found.rows:
        return np.empty((0, found.dim), np.float32)
    return np.memmap(found.path, np.float32, "r", shape=(found.rows, found.dim))


def row_scores(found: SearchRowsFile, query: np.ndarray, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, similarities of the chunk) over the mapped rows; pages go back after each chunk.

    No view of the mapping leaves this function, so the mapping can always be closed.
    """
    if found.rows == 0:
        return
    row_bytes = found.dim * 4
    with open(found.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for start in range(0, found.rows, chunk_rows):
            n = min(chunk_rows, found.rows - start)
            view = np.frombuffer(mm, np.float32, n * found.dim, start * row_bytes).reshape(n, found.dim)
            scores = view @ query
            del view
            page_start = start * row_bytes // mmap.PAGESIZE * mmap.PAGESIZE
            if hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_DONTNEED, page_start, (start + n) * row_bytes - page_start)
            yield start, scores
