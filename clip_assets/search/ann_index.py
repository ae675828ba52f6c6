"""The approximate-nearest-neighbour index: one trained codec for the collection, one shard per batch.

- The codec is an empty faiss IVF-PQ index (`IVF<lists>,PQ<dim/2>x4fs`: a coarse quantizer and
  4-bit fast-scan codes, 128 bytes per vector at dimension 512), trained once per model from a
  sample of the batches' embeddings when the first shard is built (`ann_index/codec-<model>.faiss`).
  Lists are sqrt(rows) rounded down to a power of two (2,048 at 10M), at most `MAX_LISTS`.
- A batch's shard is the codec filled with that batch's vectors: assigning and encoding them, no
  training, so a new or changed batch costs only its own rows and never touches another shard.
- A query is quantised once by the codec's coarse quantizer; every shard scans only its own part of
  the same `nprobe` lists (faiss search_preassigned), so a query over 100 shards costs about what
  one merged index would. The best `candidates` of all shards are re-ranked exactly from the batch's
  float32 search index file (`search_index/<batch>.f32`, which exact search reads too): the scores
  returned are true cosine similarities, only the candidate set is approximate.
- Until the collection holds `MIN_ROWS_FOR_IVF` rows there is no codec, and a batch's shard is
  "exact": its float32 file is scored in full, which at that size costs less than probing an index.
- A shard records the embeddings file it was built from (size, mtime) and the codec version; one
  that no longer matches is stale, and search scores that batch exactly until the shard is rebuilt.
  Results are never wrong, only slower.
- The codec is kept as the collection grows (the fraction of lists a query must probe barely depends
  on the number of lists: benchmarks/ann_index.py). To retrain it, delete `ann_index/codec-*` and
  re-materialize image_search_index for every batch.
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

from clip_assets.storage.atomic_files import atomic_write, write_text_atomically
from clip_assets.storage.file_hashes import current_content_digest
from clip_assets.config.layout import DataLayout

log = logging.getLogger(__name__)

MIN_ROWS_FOR_IVF = 20_000  # the collection's rows before a codec is trained; below, batches are scored exactly
MAX_LISTS = 4096
TRAINING_POINTS_PER_LIST = 40  # faiss warns below 39
MAX_TRAINING_BATCHES = 64  # the codec's sample is drawn from at most this many batches
ADD_CHUNK_ROWS = 65_536
DEFAULT_NPROBE = 32  # near-duplicates: pairs at cosine >= 0.95 sit in the same or neighbouring lists
# A text or image search. On 10M clustered vectors in 100 shards of 100k (benchmarks/ann_index.py,
# codec IVF2048,PQ256x4fs, 2 cores), nprobe 128 with 300 re-ranked gave recall@10 0.961 at a p50 of
# 27 ms with the re-ranked rows in the page cache and 34 ms with the page cache emptied first; 200
# re-ranked gave 0.952, 500 gave 0.970 at 31 / 55-65 ms. A smaller collection has fewer lists, so
# the same nprobe is a larger share of them.
SEARCH_NPROBE = 128
SEARCH_CANDIDATES = 300
KIND_IVF = "ivf_pq"
KIND_EXACT = "exact"


class IndexNotBuiltError(LookupError):
    """A batch has no embeddings to index, or no fresh shard to search."""


def codec_lists(rows: int) -> int:
    """The inverted lists of a codec for a collection of `rows` vectors: sqrt(rows) rounded down to a
    power of two, at most MAX_LISTS, with at least TRAINING_POINTS_PER_LIST rows each."""
    lists = 2 ** math.floor(math.log2(max(16.0, math.sqrt(rows))))
    return max(16, min(MAX_LISTS, lists, 2 ** math.floor(math.log2(max(16, rows // TRAINING_POINTS_PER_LIST)))))


def factory_string(lists: int, parts: int) -> str:
    return f"IVF{lists},PQ{parts}x4fs"


def codec_factory(rows: int, dim: int) -> str:
    """The faiss factory string of a codec for a collection of `rows` vectors: codec_lists(rows)
    lists and 4-bit PQ over dim/2 parts."""
    parts = max(2, dim // 2)
    while dim % parts:
        parts -= 1
    return factory_string(codec_lists(rows), parts)


def train_codec(sample: np.ndarray, rows: int, target: Path) -> bool:
    """Train an empty IVF-PQ index for a collection of `rows` vectors on `sample` (n, dim) and write
    it to `target` unless another process wrote one first: the first codec written is the one every
    shard uses. True when this call's codec is the one at `target`."""
    import faiss

    index = faiss.index_factory(sample.shape[1], codec_factory(rows, sample.shape[1]), faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    target.parent.mkdir(parents=True, exist_ok=True)
    written = target.with_name(target.name + ".new")
    with atomic_write(written) as tmp:
        faiss.write_index(index, str(tmp))
    try:
        os.link(written, target)  # fails when a codec is already there
        return True
    except FileExistsError:
        return False
    finally:
        written.unlink(missing_ok=True)


def fill_shard(codec, vectors: np.ndarray, target: Path) -> None:
    """The codec filled with `vectors` (rows, dim; a memmap is read a chunk at a time), written to
    `target` atomically. Row i of `vectors` gets id i."""
    import faiss

    index = faiss.clone_index(codec)
    for start in range(0, len(vectors), ADD_CHUNK_ROWS):
        index.add(np.ascontiguousarray(vectors[start : start + ADD_CHUNK_ROWS], dtype=np.float32))
    with atomic_write(target) as tmp:
        faiss.write_index(index, str(tmp))


def read_faiss(path: Path):
    import faiss

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
        import faiss

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
        import faiss

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


# --- The pipeline's codec and shards: built from the embeddings, fresh while those are unchanged. ---


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
    version: str  # changes whenever the shard is rebuilt from other embeddings or another codec
    codec: str | None = None  # the codec's version
    codec_trained: bool = False  # this build trained the codec
    codec_rows: int = 0  # the collection's rows when the codec was trained

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


def codec_version(layout: DataLayout, model: str) -> str | None:
    """The content digest of the model's codec, None when there is none (hashed again only when the file changed)."""
    try:
        return current_content_digest(layout.ann_codec_path(model))
    except FileNotFoundError:
        return None


def is_fresh(layout: DataLayout, batch: str, note: dict | None = None) -> bool:
    """The batch's shard was built from its embeddings file as it is now, with the model's codec as it is now."""
    note = read_note(layout, batch) if note is None else note
    embeddings = layout.embeddings_path(batch)
    if note is None or not embeddings.is_file():
        return False
    if {k: note.get(k) for k in ("source", "size", "mtime_ns")} != embeddings_stamp(embeddings):
        return False
    if note["kind"] == KIND_EXACT:
        return True
    return layout.ann_shard_path(batch).is_file() and note.get("codec") == codec_version(layout, note["model"])


def codec_sample(layout: DataLayout, model: str, batch: str, vectors: np.ndarray, seed: int) -> tuple[np.ndarray, int]:
    """(a training sample, the collection's rows): the sample is drawn from this batch's vectors and
    those of up to MAX_TRAINING_BATCHES - 1 other batches of the same model whose float32 search
    index is already written, each in proportion to its rows, twice TRAINING_POINTS_PER_LIST per list
    of the codec the collection's rows (all such batches) call for."""
    from clip_assets.search.query import fresh_search_index, stored_models

    rng = np.random.default_rng(seed)
    others = []
    for embeddings in sorted(layout.embeddings_dir.glob("*.parquet")):
        if embeddings.stem == Path(layout.embeddings_path(batch)).stem:
            continue
        found = fresh_search_index(embeddings)
        if found is not None and found.rows and found.dim == vectors.shape[1] and stored_models(embeddings) == {model}:
            others.append(found)
    collection_rows = len(vectors) + sum(f.rows for f in others)
    if len(others) > MAX_TRAINING_BATCHES - 1:
        others = [others[i] for i in sorted(rng.choice(len(others), MAX_TRAINING_BATCHES - 1, replace=False))]
    sources = [vectors] + [np.memmap(f.path, np.float32, "r", shape=(f.rows, f.dim)) for f in others]
    rows = sum(len(v) for v in sources)
    wanted = min(rows, codec_lists(collection_rows) * TRAINING_POINTS_PER_LIST * 2)
    parts = []
    for v in sources:  # each batch in proportion to its rows
        take = min(len(v), max(1, round(wanted * len(v) / rows)))
        parts.append(np.asarray(v[np.sort(rng.choice(len(v), take, replace=False))], dtype=np.float32))
    return np.concatenate(parts), collection_rows


def model_codec(layout: DataLayout, model: str, batch: str, vectors: np.ndarray, seed: int = 0):
    """(the model's codec, its version, whether this call trained it, the rows it was trained for);
    (None, None, False, 0) while the collection is too small for one."""
    path = layout.ann_codec_path(model)
    trained = False
    if not path.is_file():
        sample, rows = codec_sample(layout, model, batch, vectors, seed)
        if rows < MIN_ROWS_FOR_IVF:
            return None, None, False, 0
        trained = train_codec(sample, rows, path)
        if trained:
            write_text_atomically(json.dumps({"model": model, "factory": codec_factory(rows, vectors.shape[1]),
                                              "collection_rows": rows, "sample_rows": len(sample), "trained_by": batch}),
                                  layout.ann_codec_note_path(model))
    try:
        note = json.loads(layout.ann_codec_note_path(model).read_text())
    except (OSError, ValueError):
        note = {}
    return read_faiss(path), codec_version(layout, model), trained, int(note.get("collection_rows", 0))


def build_batch_shard(layout: DataLayout, batch: str, seed: int = 0) -> ShardSummary:
    """(Re)build one batch's shard from its embeddings with the model's codec (trained first when the
    collection has none yet and is large enough); the other batches' shards are not touched."""
    from clip_assets.search.query import ensure_search_index, stored_models

    embeddings = layout.embeddings_path(batch)
    if not embeddings.is_file():
        raise IndexNotBuiltError(f"No embeddings for batch {batch} at {embeddings}: materialize image_embeddings first.")
    started = time.perf_counter()
    stamp = embeddings_stamp(embeddings)
    vectors_file = ensure_search_index(embeddings)  # the float32 rows that candidates are re-ranked from
    models = sorted(stored_models(embeddings)) if vectors_file.rows else []
    if len(models) > 1:
        raise ValueError(f"{embeddings} holds embeddings of several models {models}: re-materialize image_embeddings.")
    model = models[0] if models else ""
    target = layout.ann_shard_path(batch)
    vectors = np.memmap(vectors_file.path, np.float32, "r", shape=(vectors_file.rows, vectors_file.dim)) \
        if vectors_file.rows else np.empty((0, vectors_file.dim), np.float32)
    codec, version_of_codec, trained, codec_rows = model_codec(layout, model, batch, vectors, seed) \
        if vectors_file.rows else (None, None, False, 0)
    if codec is not None:
        fill_shard(codec, vectors, target)
        kind, factory, index_bytes = KIND_IVF, factory_string(codec.nlist, codec.pq.M), target.stat().st_size
    else:
        target.unlink(missing_ok=True)
        kind, factory, index_bytes = KIND_EXACT, None, 0
    version = hashlib.sha1(json.dumps([stamp, kind, factory, version_of_codec]).encode()).hexdigest()[:16]
    note = {**stamp, "kind": kind, "factory": factory, "rows": vectors_file.rows, "dim": vectors_file.dim,
            "model": model, "codec": version_of_codec, "version": version}
    write_text_atomically(json.dumps(note), layout.ann_shard_note_path(batch))
    return ShardSummary(batch, kind, factory, vectors_file.rows, vectors_file.dim, model, index_bytes,
                        time.perf_counter() - started, version, version_of_codec, trained, codec_rows)


def shard_version(layout: DataLayout, batch: str) -> str | None:
    """The version of the batch's shard when it is fresh, else None."""
    note = read_note(layout, batch)
    return note["version"] if note is not None and is_fresh(layout, batch, note) else None


_opened: dict[tuple[str, str], object] = {}


def _open_cached(path: Path, version: str):
    """Shards stay open for the life of the process; a rebuilt shard is opened anew."""
    key = (str(path), version)
    if key not in _opened:
        for stale in [k for k in _opened if k[0] == key[0]]:
            del _opened[stale]
        _opened[key] = read_faiss(path)
    return _opened[key]


def open_batch_shards(layout: DataLayout, batches: list[str]) -> tuple[list[Shard], list[str]]:
    """The fresh shards of `batches`, and the batches without one (missing or stale)."""
    from clip_assets.search.query import ensure_search_index

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
        shards.append(Shard(batch, vectors, index, note.get("codec") if index is not None else None))
    return shards, without


def approximate_top_k(
    layout: DataLayout,
    files: list[Path],
    query: np.ndarray,
    k: int,
    allowed_ids: set[str] | None = None,
    nprobe: int = SEARCH_NPROBE,
    candidates: int = SEARCH_CANDIDATES,
) -> list[tuple[float, str, str]]:
    """(score, image_id, batch) of the k best, best first: through the shards of the batches that
    have a fresh one, exactly (clip_assets.search.query.top_k_streaming) for the others."""
    from clip_assets.search.query import top_k_streaming

    batches = [f.stem for f in files]
    shards, without = open_batch_shards(layout, batches)
    if without:
        log.warning("no fresh index shard for %d batch(es) (%s): searched exactly; materialize image_search_index",
                    len(without), ", ".join(without[:5]))
    if allowed_ids is not None:
        allowed = pa.array(sorted(allowed_ids), pa.string())
        for s in shards:
            ids = pq.read_table(layout.embeddings_path(s.name), columns=["image_id"])["image_id"]
            s.allowed_rows = np.nonzero(pc.is_in(ids, value_set=allowed).to_numpy(zero_copy_only=False))[0]
    hits: list[tuple[float, str, str]] = []
    if shards:
        scores, shard_no, rows = ShardSet(shards).top_k(np.asarray(query, np.float32)[None], k, nprobe, candidates)
        found = [(score, shards[s].name, row) for score, s, row in zip(scores[0].tolist(), shard_no[0].tolist(),
                                                                         rows[0].tolist()) if math.isfinite(score)]
        for batch in {b for _, b, _ in found}:
            ids = image_ids_at(layout.embeddings_path(batch), [row for _, b, row in found if b == batch])
            hits += [(score, ids[row], b) for score, b, row in found if b == batch]
    if without:
        hits += top_k_streaming(query, [layout.embeddings_path(b) for b in without], k, allowed_ids)
    return sorted(hits, key=lambda h: (-h[0], h[1]))[:k]


def image_ids_at(embeddings_file: Path, rows: list[int]) -> dict[int, str]:
    """{row: image_id} of the given rows of an embeddings file, reading only the row groups that hold them."""
    pf = pq.ParquetFile(embeddings_file)
    starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
    out: dict[int, str] = {}
    for group in sorted({int(np.searchsorted(starts, r, "right")) - 1 for r in rows}):
        ids = pf.read_row_group(group, columns=["image_id"])["image_id"]
        for r in rows:
            if starts[group] <= r < starts[group + 1]:
                out[r] = ids[r - int(starts[group])].as_py()
    return out
