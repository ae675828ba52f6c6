"""Searching a set of approximate-nearest-neighbour shards together: the query quantised once by the
shared codec's coarse quantizer, approximate candidates from each shard's part of the same lists,
merged, and re-ranked exactly from the float32 search rows. The shards themselves are built and kept
fresh by clip_assets.search.ann_index.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clip_assets.config.settings import default

# A text or image search. On 10M clustered vectors in 100 shards of 100k (benchmarks/ann_index.py,
# codec IVF2048,PQ256x4fs, 2 cores), nprobe 128 with 300 re-ranked gave recall@10 0.961 at a p50 of
# 27 ms with the re-ranked rows in the page cache and 34 ms with the page cache emptied first; 200
# re-ranked gave 0.952, 500 gave 0.970 at 31 / 55-65 ms. A smaller collection has fewer lists, so
# the same nprobe is a larger share of them.
SEARCH_NPROBE = default("ann_nprobe")  # CLIP_ASSETS_ANN_NPROBE
SEARCH_CANDIDATES = 300


def read_faiss(path: Path):
    import faiss  # deferred: the search CLI and the code location import this module, faiss (0.2 s) only to use an index

    return faiss.read_index(str(path), faiss.IO_FLAG_READ_ONLY)


@dataclass
class Shard:
    name: str  # the batch
    vectors: np.ndarray  # (rows, dim) float32, memory-mapped: what candidates are re-ranked with
    index: object | None  # the faiss index, filled from the codec; None: scored exactly
    codec: str | None = None  # the version of the codec the index was filled from
    allowed_rows: np.ndarray | None = None  # restrict to these rows (a category filter)


class ShardSet:
    """Shards searched together: the query quantised once, approximate candidates from each shard's
    part of the same lists, merged, re-ranked exactly. The IVF shards must share one codec."""

    def __init__(self, shards: list[Shard], threads: int | None = None):
        import faiss  # deferred: the search CLI and the code location import this module, faiss (0.2 s) only to use an index

        self.shards = shards
        self.threads = max(1, threads or os.cpu_count() or 1)
        ivf = [s for s in shards if s.index is not None]
        if len({s.codec for s in ivf}) > 1:
            raise ValueError(f"index shards of different codecs cannot be searched together: {sorted({s.codec for s in ivf})}")
        self.quantizer = faiss.extract_index_ivf(ivf[0].index).quantizer if ivf else None

    def candidates(self, queries: np.ndarray, per_shard: int, nprobe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(approximate scores, shard numbers, rows), each (queries, per_shard): the best per_shard of
        all shards, best first per query; -inf pads."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        lists = None
        if self.quantizer is not None:
            nprobe = min(nprobe, self.quantizer.ntotal)
            lists = self.quantizer.search(queries, nprobe)  # (similarities, list numbers), shared by every shard

        def shard_range(first: int) -> list[tuple[np.ndarray, np.ndarray]]:
            return [self._shard_candidates(self.shards[i], queries, per_shard, lists)
                    for i in range(first, len(self.shards), workers)]

        # few queries: spread the shards over threads; many: faiss spreads the queries over its own
        workers = self.threads if len(queries) < self.threads and len(self.shards) > 1 else 1
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                by_worker = list(pool.map(shard_range, range(workers)))
            parts = [by_worker[i % workers][i // workers] for i in range(len(self.shards))]
        else:
            parts = shard_range(0)
        scores = np.concatenate([p[0] for p in parts], axis=1)
        rows = np.concatenate([p[1] for p in parts], axis=1)
        shard_no = np.concatenate([np.full(p[1].shape, i, np.int64) for i, p in enumerate(parts)], axis=1)
        if scores.shape[1] > per_shard:  # keep the best per_shard of all shards before sorting
            best = np.argpartition(-scores, per_shard - 1, axis=1)[:, :per_shard]
            scores, shard_no, rows = (np.take_along_axis(a, best, 1) for a in (scores, shard_no, rows))
        order = np.argsort(-scores, axis=1, kind="stable")
        return (np.take_along_axis(scores, order, 1), np.take_along_axis(shard_no, order, 1),
                np.take_along_axis(rows, order, 1))

    @staticmethod
    def _shard_candidates(shard: Shard, queries: np.ndarray, per_shard: int, lists):
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
        import faiss  # deferred: the search CLI and the code location import this module, faiss (0.2 s) only to use an index

        list_scores, list_numbers = lists
        params = faiss.SearchParametersIVF(nprobe=list_numbers.shape[1])
        if shard.allowed_rows is not None:
            params.sel = selector = faiss.IDSelectorBatch(shard.allowed_rows.astype(np.int64))  # noqa: F841 (kept alive)
        scores = np.empty((len(queries), per_shard), np.float32)
        rows = np.empty((len(queries), per_shard), np.int64)
        shard.index.search_preassigned_c(
            len(queries), faiss.swig_ptr(queries), per_shard, faiss.swig_ptr(list_numbers),
            faiss.swig_ptr(list_scores), faiss.swig_ptr(scores), faiss.swig_ptr(rows), False, params)
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

    def top_k(self, queries: np.ndarray, k: int, nprobe: int = SEARCH_NPROBE,
              candidates: int = SEARCH_CANDIDATES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(exact scores, shard numbers, rows), each (queries, k), best first, of the re-ranked candidates."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        candidates = max(candidates, k)
        _, shard_no, rows = self.candidates(queries, candidates, nprobe)
        shard_no, rows = shard_no[:, :candidates], rows[:, :candidates]
        exact = self.exact_scores(queries, shard_no, rows)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return (np.take_along_axis(exact, order, 1), np.take_along_axis(shard_no, order, 1),
                np.take_along_axis(rows, order, 1))
