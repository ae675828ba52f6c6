"""The approximate-nearest-neighbour index: one faiss IVF-PQ shard per image batch, re-ranked exactly.

Each batch's embeddings get their own shard (`ann_index/<batch>.faiss`), trained on that batch
alone, so a new or changed batch builds one shard and never touches the others. A query asks every
shard for its best candidates by approximate (product-quantised) similarity, keeps the best
`candidates` of all of them, and re-ranks those exactly from the batch's float32 search index file
(`search_index/<batch>.f32`, which exact search reads too): the scores returned are true cosine
similarities, only the candidate set is approximate.

- A shard is IVF-PQ with 4-bit fast-scan codes (`IVF<lists>,PQ<dim/4>x4fs`: 64 bytes per vector
  at dimension 512), lists about 4 x sqrt(rows). Its file is memory-mapped when opened.
- A batch under `MIN_ROWS_FOR_IVF` rows gets no faiss file: its float32 file is scored exactly,
  which at that size costs less than probing an index.
- A shard records the embeddings file it was built from (size, mtime); one that no longer matches is
  stale, and search scores that batch exactly until the shard is rebuilt. Results are never wrong,
  only slower.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_assets.atomic_files import atomic_write, write_text_atomically
from clip_assets.layout import DataLayout

log = logging.getLogger(__name__)

MIN_ROWS_FOR_IVF = 20_000  # below: scored exactly (20k x 512 is ~2 ms), no training needed
MAX_LISTS = 8192
TRAINING_POINTS_PER_LIST = 40  # faiss warns below 39
ADD_CHUNK_ROWS = 65_536
DEFAULT_NPROBE = 32
DEFAULT_CANDIDATES = 200  # re-ranked exactly per query
# A text or image search: on 1M clustered vectors in 10 shards of 100k (benchmarks/ann_index.py), 3,000
# re-ranked with nprobe 256 gave recall@10 0.95 (200 with nprobe 32: 0.61). Re-ranking 3,000 rows is
# about 6 MB read, whatever the number of shards.
SEARCH_CANDIDATES = 3000
KIND_IVF = "ivf_pq"
KIND_EXACT = "exact"


class IndexNotBuiltError(LookupError):
    """A batch has no embeddings to index, or no fresh shard to search."""


def shard_factory(rows: int, dim: int) -> str:
    """The faiss factory string of a shard of `rows` vectors: lists ~4 sqrt(rows), 4-bit PQ over dim/4 parts."""
    lists = 2 ** round(math.log2(max(16.0, 4 * math.sqrt(rows))))
    lists = min(MAX_LISTS, lists, max(16, rows // TRAINING_POINTS_PER_LIST))
    parts = max(2, dim // 4)
    while dim % parts:
        parts -= 1
    return f"IVF{lists},PQ{parts}x4fs"


def build_shard(vectors: np.ndarray, target: Path, seed: int = 0) -> str:
    """Train and fill an IVF-PQ index over `vectors` (rows, dim; a memmap is read a chunk at a time)
    and write it to `target` atomically. Row i of `vectors` gets id i. Returns the factory string."""
    import faiss

    rows, dim = vectors.shape
    factory = shard_factory(rows, dim)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    lists = faiss.extract_index_ivf(index).nlist
    sample = np.sort(np.random.default_rng(seed).choice(rows, min(rows, lists * TRAINING_POINTS_PER_LIST * 2), replace=False))
    index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
    for start in range(0, rows, ADD_CHUNK_ROWS):
        index.add(np.ascontiguousarray(vectors[start : start + ADD_CHUNK_ROWS], dtype=np.float32))
    with atomic_write(target) as tmp:
        faiss.write_index(index, str(tmp))
    return factory


def open_shard(path: Path):
    """A shard's faiss index, its file memory-mapped."""
    import faiss

    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)


@dataclass
class Shard:
    name: str  # the batch
    vectors: np.ndarray  # (rows, dim) float32, memory-mapped: what candidates are re-ranked with
    index: object | None  # the faiss index; None: scored exactly
    allowed_rows: np.ndarray | None = None  # restrict to these rows (a category filter)


class ShardSet:
    """Shards searched together: approximate candidates from each, merged, re-ranked exactly."""

    def __init__(self, shards: list[Shard], threads: int | None = None):
        self.shards = shards
        self.threads = max(1, threads or os.cpu_count() or 1)

    def candidates(self, queries: np.ndarray, per_shard: int, nprobe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(approximate scores, shard numbers, rows), each (queries, n), best first per query; -inf pads."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)

        def one(shard_no: int) -> tuple[np.ndarray, np.ndarray]:
            return self._shard_candidates(self.shards[shard_no], queries, per_shard, nprobe)

        if len(queries) < self.threads and len(self.shards) > 1:  # few queries: spread the shards over threads
            with ThreadPoolExecutor(self.threads) as pool:
                parts = list(pool.map(one, range(len(self.shards))))
        else:  # many queries: faiss spreads them over its own threads
            parts = [one(i) for i in range(len(self.shards))]
        scores = np.concatenate([p[0] for p in parts], axis=1)
        rows = np.concatenate([p[1] for p in parts], axis=1)
        shard_no = np.concatenate([np.full(p[1].shape, i, np.int64) for i, p in enumerate(parts)], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")
        return (np.take_along_axis(scores, order, 1), np.take_along_axis(shard_no, order, 1),
                np.take_along_axis(rows, order, 1))

    @staticmethod
    def _shard_candidates(shard: Shard, queries: np.ndarray, per_shard: int, nprobe: int):
        if shard.allowed_rows is not None and len(shard.allowed_rows) == 0:
            empty = np.empty((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        if shard.index is None:
            vectors = shard.vectors if shard.allowed_rows is None else shard.vectors[shard.allowed_rows]
            scores = queries @ np.asarray(vectors).T
            take = min(per_shard, scores.shape[1])
            top = np.argpartition(-scores, take - 1, axis=1)[:, :take] if take < scores.shape[1] else \
                np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
            rows = top if shard.allowed_rows is None else shard.allowed_rows[top]
            return np.take_along_axis(scores, top, 1).astype(np.float32), rows.astype(np.int64)
        import faiss

        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if shard.allowed_rows is not None:
            selector = faiss.IDSelectorBatch(shard.allowed_rows.astype(np.int64))
            params = faiss.SearchParametersIVF(nprobe=nprobe, sel=selector)
        scores, rows = shard.index.search(queries, per_shard, params=params)
        scores[rows < 0] = -np.inf
        return scores, rows

    def vectors_of(self, shard_no: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(n, dim) float32: the stored vector of each (shard_no[i], rows[i]); rows must be >= 0."""
        out = np.empty((len(rows), self.shards[0].vectors.shape[1]), np.float32)
        for s in np.unique(shard_no):
            mask = shard_no == s
            wanted, where = np.unique(rows[mask], return_inverse=True)  # sorted rows: fewer page faults
            out[mask] = np.asarray(self.shards[s].vectors[wanted], dtype=np.float32)[where]
        return out

    def exact_scores(self, queries: np.ndarray, shard_no: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact similarity of query i with (shard_no[i, j], rows[i, j]); -inf where rows < 0."""
        out = np.full(rows.shape, -np.inf, np.float32)
        valid = rows >= 0
        if valid.any():
            query_of = np.nonzero(valid)[0]
            out[valid] = np.einsum("ij,ij->i", self.vectors_of(shard_no[valid], rows[valid]), queries[query_of])
        return out

    def top_k(self, queries: np.ndarray, k: int, nprobe: int = DEFAULT_NPROBE,
              candidates: int = DEFAULT_CANDIDATES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(exact scores, shard numbers, rows), each (queries, k), best first, of the re-ranked candidates."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        candidates = max(candidates, k)
        _, shard_no, rows = self.candidates(queries, candidates, nprobe)
        shard_no, rows = shard_no[:, :candidates], rows[:, :candidates]
        exact = self.exact_scores(queries, shard_no, rows)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return (np.take_along_axis(exact, order, 1), np.take_along_axis(shard_no, order, 1),
                np.take_along_axis(rows, order, 1))


# --- Shards of the pipeline's batches: built from the embeddings, fresh while those are unchanged. ---


@dataclass(frozen=True)
class ShardSummary:
    batch: str
    kind: str  # ivf_pq or exact
    factory: str | None
    rows: int
    dim: int
    model: str
    index_bytes: int
    build_s: float
    version: str  # changes whenever the shard is rebuilt from other embeddings

    @property
    def bytes_per_vector(self) -> float:
        return self.index_bytes / max(1, self.rows)


def embeddings_stamp(embeddings_file: Path) -> dict:
    st = embeddings_file.stat()
    return {"source": embeddings_file.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_note(layout: DataLayout, batch: str) -> dict | None:
    path = layout.ann_shard_note_path(batch)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_fresh(layout: DataLayout, batch: str, note: dict | None = None) -> bool:
    """The batch's shard was built from its embeddings file as it is now."""
    note = read_note(layout, batch) if note is None else note
    embeddings = layout.embeddings_path(batch)
    if note is None or not embeddings.is_file():
        return False
    if {k: note.get(k) for k in ("source", "size", "mtime_ns")} != embeddings_stamp(embeddings):
        return False
    return note["kind"] == KIND_EXACT or layout.ann_shard_path(batch).is_file()


def build_batch_shard(layout: DataLayout, batch: str, seed: int = 0) -> ShardSummary:
    """(Re)build one batch's shard from its embeddings; the other batches' shards are not touched."""
    from clip_assets.search import ensure_search_index, stored_models

    embeddings = layout.embeddings_path(batch)
    if not embeddings.is_file():
        raise IndexNotBuiltError(f"No embeddings for batch {batch} at {embeddings}: materialize image_embeddings first.")
    started = time.perf_counter()
    stamp = embeddings_stamp(embeddings)
    vectors_file = ensure_search_index(embeddings)  # the float32 rows that candidates are re-ranked from
    models = sorted(stored_models(embeddings)) if vectors_file.rows else []
    if len(models) > 1:
        raise ValueError(f"{embeddings} holds embeddings of several models {models}: re-materialize image_embeddings.")
    target = layout.ann_shard_path(batch)
    if vectors_file.rows >= MIN_ROWS_FOR_IVF:
        vectors = np.memmap(vectors_file.path, np.float32, "r", shape=(vectors_file.rows, vectors_file.dim))
        kind, factory = KIND_IVF, build_shard(vectors, target, seed)
        index_bytes = target.stat().st_size
    else:
        target.unlink(missing_ok=True)
        kind, factory, index_bytes = KIND_EXACT, None, 0
    version = hashlib.sha1(json.dumps([stamp, kind, factory]).encode()).hexdigest()[:16]
    note = {**stamp, "kind": kind, "factory": factory, "rows": vectors_file.rows, "dim": vectors_file.dim,
            "model": models[0] if models else "", "version": version}
    write_text_atomically(json.dumps(note), layout.ann_shard_note_path(batch))
    return ShardSummary(batch, kind, factory, vectors_file.rows, vectors_file.dim, note["model"], index_bytes,
                        time.perf_counter() - started, version)


def shard_version(layout: DataLayout, batch: str) -> str | None:
    """The version of the batch's shard when it is fresh, else None."""
    note = read_note(layout, batch)
    return note["version"] if note is not None and is_fresh(layout, batch, note) else None


_opened: dict[tuple[str, str], object] = {}


def _open_cached(path: Path, version: str):
    """Shards stay open (mapped) for the life of the process; a rebuilt shard is opened anew."""
    key = (str(path), version)
    if key not in _opened:
        for stale in [k for k in _opened if k[0] == key[0]]:
            del _opened[stale]
        _opened[key] = open_shard(path)
    return _opened[key]


def open_batch_shards(layout: DataLayout, batches: list[str]) -> tuple[list[Shard], list[str]]:
    """The fresh shards of `batches`, and the batches without one (missing or stale)."""
    from clip_assets.search import ensure_search_index

    shards, without = [], []
    for batch in batches:
        note = read_note(layout, batch)
        if note is None or not is_fresh(layout, batch, note):
            without.append(batch)
            continue
        vectors_file = ensure_search_index(layout.embeddings_path(batch))
        vectors = np.memmap(vectors_file.path, np.float32, "r", shape=(vectors_file.rows, vectors_file.dim)) \
            if vectors_file.rows else np.empty((0, vectors_file.dim), np.float32)
        index = _open_cached(layout.ann_shard_path(batch), note["version"]) if note["kind"] == KIND_IVF else None
        shards.append(Shard(batch, vectors, index))
    return shards, without


def approximate_top_k(
    layout: DataLayout,
    files: list[Path],
    query: np.ndarray,
    k: int,
    allowed_ids: set[str] | None = None,
    nprobe: int = DEFAULT_NPROBE,
    candidates: int = SEARCH_CANDIDATES,
) -> list[tuple[float, str, str]]:
    """(score, image_id, batch) of the k best, best first: through the shards of the batches that
    have a fresh one, exactly (clip_assets.search.top_k_streaming) for the others."""
    from clip_assets.search import top_k_streaming

    batches = [f.stem for f in files]
    shards, without = open_batch_shards(layout, batches)
    if without:
        log.warning("no fresh index shard for %d batch(es) (%s): searched exactly; materialize image_search_index",
                    len(without), ", ".join(without[:5]))
    ids = {s.name: pq.read_table(layout.embeddings_path(s.name), columns=["image_id"])["image_id"] for s in shards}
    if allowed_ids is not None:
        allowed = pa.array(sorted(allowed_ids), pa.string())
        for s in shards:
            s.allowed_rows = np.nonzero(pc.is_in(ids[s.name], value_set=allowed).to_numpy(zero_copy_only=False))[0]
    hits: list[tuple[float, str, str]] = []
    if shards:
        scores, shard_no, rows = ShardSet(shards).top_k(np.asarray(query, np.float32)[None], k, nprobe, candidates)
        for score, s, row in zip(scores[0].tolist(), shard_no[0].tolist(), rows[0].tolist()):
            if math.isfinite(score):
                hits.append((score, ids[shards[s].name][row].as_py(), shards[s].name))
    if without:
        hits += top_k_streaming(query, [layout.embeddings_path(b) for b in without], k, allowed_ids)
    return sorted(hits, key=lambda h: (-h[0], h[1]))[:k]
