"""Exact nearest-neighbour search over the stored embeddings, and what every search checks first.

Every stored embedding is scored against the query (cosine similarity, as a dot product of unit
vectors), from each batch's search rows (clip_assets.search.search_rows) or straight from the parquet
file, a chunk at a time, and a running top-k is kept, so memory stays bounded by one chunk plus k
candidates however large the collection is. Hits are ordered by score, best first, and equal scores
by image_id. Search refuses embeddings that carry another model's identity than the query's:
similarities across models mean nothing.
"""

from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_assets.config.layout import DataLayout
from clip_assets.search.search_rows import DEFAULT_RECORD_BATCH_ROWS, ensure_search_rows, row_scores
from clip_assets.storage.arrow_vectors import vectors_matrix
from clip_assets.storage.damaged_files import EMBEDDINGS, DamagedFileError, open_parquet, parquet_batches

log = logging.getLogger(__name__)


class SearchModelMismatchError(ValueError):
    """The stored embeddings were made by another model than the one that would encode the query."""


class NothingToSearchError(LookupError):
    """No embeddings (or no batch or category of the given name) to search."""


class SearchQueryError(ValueError):
    """A query that cannot be searched for: an empty text, k below 1, or an image that can't be read."""


def embedding_files(layout: DataLayout, batches: list[str] | None = None) -> list[Path]:
    """The per-batch embedding files to search, all of them when `batches` is None."""
    if batches is None:
        return layout.embedding_files()
    missing = [b for b in batches if not layout.embeddings_path(b).is_file()]
    if missing:
        raise NothingToSearchError(
            f"No embeddings for batch(es) {', '.join(missing)} under {layout.embeddings_dir}: "
            "materialize image_embeddings for them first."
        )
    return [layout.embeddings_path(b) for b in batches]


def stored_models(path: Path) -> set[str]:
    """The model identities in an embeddings file, from the row-group statistics when they exist."""
    with EMBEDDINGS.reading(path, Path(path).stem):
        return _stored_models(pq.ParquetFile(path))


def _stored_models(pf: pq.ParquetFile) -> set[str]:
    column = pf.schema_arrow.get_field_index("model")
    found: set[str] = set()
    for rg in range(pf.metadata.num_row_groups):
        stats = pf.metadata.row_group(rg).column(column).statistics
        if stats is None or not stats.has_min_max:
            return set(pc.unique(pf.read(columns=["model"])["model"]).to_pylist())
        found.update({stats.min, stats.max})
        if len(found) > 1:  # min != max: read the column to name every model in the message
            return set(pc.unique(pf.read(columns=["model"])["model"]).to_pylist())
    return {m.decode() if isinstance(m, bytes) else m for m in found}


@dataclass
class SearchableFiles:
    files: list[Path]  # readable, and of the query's model
    damaged: list[DamagedFileError]  # left out (each logged as a warning)
    rows: int  # the embeddings in `files`


def check_query_model(files: list[Path], identity: str) -> SearchableFiles:
    """The files a query encoded by `identity` may search, each file's footer read once (its model
    identities and rows). A damaged file is left out with a warning; a file of another model refuses
    the search (SearchModelMismatchError)."""
    searchable = SearchableFiles([], [], 0)
    for path in files:
        try:
            with EMBEDDINGS.reading(path, Path(path).stem), pq.ParquetFile(path) as pf:
                others, rows = _stored_models(pf) - {identity}, pf.metadata.num_rows
        except DamagedFileError as exc:
            log.warning("left out of the search: %s", exc)
            searchable.damaged.append(exc)
            continue
        searchable.files.append(Path(path))
        searchable.rows += rows
        if others:
            raise SearchModelMismatchError(
                f"{path} holds embeddings made by {sorted(others)}, but the query would be encoded by "
                f"'{identity}' (CLIP_ASSETS_MODEL / CLIP_ASSETS_PRETRAINED, or CLIP_ASSETS_USE_FINE_TUNED). Similarities across models "
                "mean nothing, so nothing was searched: set the model that made the embeddings, or "
                "re-materialize image_embeddings with this one."
            )
    return searchable


def _parquet_scores(embeddings_file: Path, query: np.ndarray, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, similarities of the chunk) straight from the parquet file, a record batch at a time."""
    start = 0
    for rb in parquet_batches(embeddings_file, EMBEDDINGS, embeddings_file.stem, batch_size=chunk_rows,
                              columns=["embedding"]):
        scores = vectors_matrix(rb.column("embedding")) @ query
        yield start, scores
        start += len(scores)


def _image_ids(path: Path) -> pa.Array:
    with EMBEDDINGS.reading(path, path.stem):
        return pq.read_table(path, columns=["image_id"])["image_id"].combine_chunks()


class RunningTopK:
    """The k best rows seen so far, by score (descending) and then image_id, folded in a chunk at a time.

    Equal scores at the k-th place are settled by image_id, never by which rows a partial sort
    happened to pick: so a top 3 is always the start of the top 5 over the same embeddings. The
    image_ids are read (through `ids_of`: file number -> rows -> ids) only to settle such a tie and
    to name the hits at the end, not for every file scanned.
    """

    def __init__(self, k: int, ids_of: dict[int, Callable[[np.ndarray], np.ndarray]]):
        self.k = k
        self.ids_of = ids_of
        self.scores = np.empty(0, dtype=np.float32)
        self.files = np.empty(0, dtype=np.int64)
        self.rows = np.empty(0, dtype=np.int64)
        self.ids = np.empty(0, dtype=object)  # None where not read yet

    def add(self, scores: np.ndarray, file_no: int, first_row: int) -> None:
        """Fold in the scores of a file's rows from `first_row` on."""
        candidates = np.flatnonzero(np.isfinite(scores))  # -inf marks rows a filter left out
        if len(self.scores) >= self.k:
            # Only rows at or above the current k-th score can enter (at it, by a smaller image_id).
            candidates = candidates[scores[candidates] >= self.scores.min()]
        if len(candidates) > self.k:
            values = scores[candidates]
            kth = -np.partition(-values, self.k - 1)[self.k - 1]
            candidates = candidates[values >= kth]  # the chunk's k best and every row tied with the k-th
        if len(candidates):
            self.merge(scores[candidates], np.full(len(candidates), file_no), candidates + first_row,
                       np.full(len(candidates), None, dtype=object))

    def merge(self, scores: np.ndarray, files: np.ndarray, rows: np.ndarray, ids: np.ndarray) -> None:
        scores = np.concatenate([self.scores, scores])
        files = np.concatenate([self.files, files])
        rows = np.concatenate([self.rows, rows])
        ids = np.concatenate([self.ids, ids])
        if len(scores) > self.k:
            kth = -np.partition(-scores, self.k - 1)[self.k - 1]
            above = np.flatnonzero(scores > kth)
            tied = np.flatnonzero(scores == kth)
            if len(above) + len(tied) > self.k:  # a tie across the k-th place: the smaller image_ids stay
                self._read_ids(ids, files, rows, tied)
                tied = tied[np.argsort(ids[tied].astype(str), kind="stable")[: self.k - len(above)]]
            keep = np.concatenate([above, tied])
            scores, files, rows, ids = scores[keep], files[keep], rows[keep], ids[keep]
        self.scores, self.files, self.rows, self.ids = scores, files, rows, ids

    def _read_ids(self, ids: np.ndarray, files: np.ndarray, rows: np.ndarray, which: np.ndarray) -> None:
        missing = which[np.equal(ids[which], None)]
        for file_no in np.unique(files[missing]).tolist():
            at = missing[files[missing] == file_no]
            ids[at] = self.ids_of[file_no](rows[at])

    def best_first(self) -> list[tuple[float, str, int]]:
        """(score, image_id, file number) of the kept rows, by score and then image_id."""
        self._read_ids(self.ids, self.files, self.rows, np.arange(len(self.ids)))
        order = np.lexsort((self.ids.astype(str), -self.scores))
        return [(float(self.scores[i]), str(self.ids[i]), int(self.files[i])) for i in order]


def top_k_streaming(
    query: np.ndarray,
    files: list[Path],
    k: int,
    allowed_ids: set[str] | None = None,
    record_batch_rows: int = DEFAULT_RECORD_BATCH_ROWS,
    use_search_rows: bool = True,
    threads: int | None = None,
    damaged: list[DamagedFileError] | None = None,
) -> list[tuple[float, str, str]]:
    """(score, image_id, batch) of the k stored embeddings most similar to `query`, best first
    (equal scores by image_id).

    Each file is read a chunk of `record_batch_rows` at a time: from its search rows (built on
    first use), or straight from the parquet file when `use_search_rows` is False or the rows cannot be
    written. `allowed_ids` restricts the candidates (a category filter). Files are spread over
    `threads` (default: the core count). The batch is the file's stem, as the layout names it. A
    file that turns out damaged is left out with a warning, and added to `damaged` when it is given.
    """
    if k < 1:
        raise SearchQueryError(f"k must be at least 1 (got {k})")
    query = np.asarray(query, dtype=np.float32).reshape(-1)
    allowed = pa.array(sorted(allowed_ids), pa.string()) if allowed_ids is not None else None
    columns = [functools.cache(lambda path=path: _image_ids(path))
               for path in files]  # each file's image_id column, read once and only where needed
    ids_of = {n: (lambda rows, column=column: column().take(pa.array(rows)).to_numpy(zero_copy_only=False))
              for n, column in enumerate(columns)}

    def one_file(file_no: int) -> RunningTopK:
        try:
            return scored_file(file_no)
        except DamagedFileError as exc:  # the other files are still searched
            log.warning("left out of the search: %s", exc)
            if damaged is not None:
                damaged.append(exc)
            return RunningTopK(k, ids_of)

    def scored_file(file_no: int) -> RunningTopK:
        path = files[file_no]
        dim = open_parquet(path, EMBEDDINGS, path.stem).schema_arrow.field("embedding").type.list_size
        if dim != query.shape[0]:
            raise SearchModelMismatchError(f"{path} holds embeddings of dimension {dim}, the query has {query.shape[0]}.")
        top = RunningTopK(k, ids_of)
        keep = None
        if allowed is not None:
            keep = pc.is_in(columns[file_no](), value_set=allowed).to_numpy(zero_copy_only=False)
            if not keep.any():
                return top
        chunks = _parquet_scores(path, query, record_batch_rows)
        if use_search_rows:
            try:
                chunks = row_scores(ensure_search_rows(path, record_batch_rows), query, record_batch_rows)
            except OSError as exc:  # a read-only data directory: search the parquet file itself
                log.warning("no search rows for %s (%s); reading the parquet file", path, exc)
        for start, scores in chunks:
            if keep is not None:
                scores = np.where(keep[start : start + len(scores)], scores, -np.inf).astype(np.float32)
            top.add(scores, file_no, start)
        return top

    workers = max(1, min(len(files), threads or os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # numpy and the file reads release the GIL
        partial = list(pool.map(one_file, range(len(files))))
    top = RunningTopK(k, ids_of)
    for p in partial:
        if len(p.scores):
            top.merge(p.scores, p.files, p.rows, p.ids)
    return [(score, image_id, files[file_no].stem) for score, image_id, file_no in top.best_first()]
