"""The approximate-nearest-neighbour index: one trained codec for the collection, one shard per batch.

- The codec is an empty faiss IVF-PQ index (`IVF<lists>,PQ<dim/2>x4fs`: a coarse quantizer and
  4-bit fast-scan codes, 128 bytes per vector at dimension 512), trained once per model from a
  sample of the batches' embeddings when the first shard is built (`ann_index/codec-<model>.faiss`).
  Lists are sqrt(rows) rounded down to a power of two (2,048 at 10M), at most `MAX_LISTS`.
- A batch's shard is the codec filled with that batch's vectors: assigning and encoding them, no
  training, so a new or changed batch costs only its own rows and never touches another shard.
- A query is quantised once by the codec's coarse quantizer; every shard scans only its own part of
  the same `nprobe` lists (faiss search_preassigned, clip_assets.search.shard_set), so a query over
  100 shards costs about what one merged index would. The best `candidates` of all shards are
  re-ranked exactly from the batch's float32 search rows (clip_assets.search.search_rows, which exact
  search reads too): the scores returned are true cosine similarities, only the candidate set is
  approximate.
- Until the collection holds `MIN_ROWS_FOR_IVF` rows there is no codec, and a batch's shard is
  "exact": its float32 search rows are scored in full, which at that size costs less than probing an index.
- A shard records the embeddings file it was built from (size, mtime) and the codec version; one
  that no longer matches is stale, and search scores that batch exactly until the shard is rebuilt.
  Results are never wrong, only slower. So is a shard that cannot be read (damaged: named in a
  warning, with the command that rebuilds it); a damaged codec is moved aside and trained again by
  the next shard built.
- The codec is kept as the collection grows (the fraction of lists a query must probe barely depends
  on the number of lists: benchmarks/ann_index.py). To retrain it, delete `ann_index/codec-*` and
  re-materialize image_search_index for every batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_assets.config.layout import DataLayout
from clip_assets.search.exact_search import stored_models, top_k_streaming
from clip_assets.search.search_rows import ensure_search_rows, fresh_search_rows, mapped_rows, source_note
from clip_assets.search.shard_set import SEARCH_CANDIDATES, SEARCH_NPROBE, Shard, ShardSet, read_faiss
from clip_assets.storage.atomic_files import (
    link_unless_there,
    remove_file,
    write_bytes_atomically,
    write_text_atomically,
)
from clip_assets.storage.damaged_files import ANN_CODEC, ANN_SHARD, READ_ERRORS, DamagedFileError, move_aside
from clip_assets.storage.file_hashes import current_content_digest

log = logging.getLogger(__name__)

MIN_ROWS_FOR_IVF = 20_000  # the collection's rows before a codec is trained; below, batches are scored exactly
MAX_LISTS = 4096
TRAINING_POINTS_PER_LIST = 40  # faiss warns below 39
MAX_TRAINING_BATCHES = 64  # the codec's sample is drawn from at most this many batches
ADD_CHUNK_ROWS = 65_536
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
    import faiss  # deferred: the search CLI and the code location import this module, faiss (0.2 s) only to use an index

    index = faiss.index_factory(sample.shape[1], codec_factory(rows, sample.shape[1]), faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    target.parent.mkdir(parents=True, exist_ok=True)
    written = target.with_name(target.name + ".new")
    # serialised in memory: faiss's file writer ignores an error that shows only when the file is closed
    write_bytes_atomically(faiss.serialize_index(index), written)
    try:
        return link_unless_there(written, target)  # False when a codec is already there
    finally:
        remove_file(written)


def fill_shard(codec, vectors: np.ndarray, target: Path) -> None:
    """The codec filled with `vectors` (rows, dim; a memmap is read a chunk at a time), written to
    `target` atomically. Row i of `vectors` gets id i."""
    import faiss  # deferred: the search CLI and the code location import this module, faiss (0.2 s) only to use an index

    index = faiss.clone_index(codec)
    for start in range(0, len(vectors), ADD_CHUNK_ROWS):
        index.add(np.ascontiguousarray(vectors[start : start + ADD_CHUNK_ROWS], dtype=np.float32))
    write_bytes_atomically(faiss.serialize_index(index), target)  # in memory first, as in train_codec


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


def read_note(layout: DataLayout, batch: str) -> dict | None:
    """The shard's note; None when there is none or it is damaged (the shard then counts as stale)."""
    path = layout.ann_shard_note_path(batch)
    try:
        note = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) and note.get("kind") in (KIND_IVF, KIND_EXACT) else None


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
    if {k: note.get(k) for k in ("source", "size", "mtime_ns")} != source_note(embeddings):
        return False
    if note["kind"] == KIND_EXACT:
        return True
    return layout.ann_shard_path(batch).is_file() and note.get("codec") == codec_version(layout, str(note.get("model")))


def codec_sample(layout: DataLayout, model: str, batch: str, vectors: np.ndarray, seed: int) -> tuple[np.ndarray, int]:
    """(a training sample, the collection's rows): the sample is drawn from this batch's vectors and
    those of up to MAX_TRAINING_BATCHES - 1 other batches of the same model whose float32 search
    rows are already written, each in proportion to its rows, twice TRAINING_POINTS_PER_LIST per list
    of the codec the collection's rows (all such batches) call for."""
    rng = np.random.default_rng(seed)
    others = []
    for embeddings in layout.embedding_files():
        if embeddings.stem == Path(layout.embeddings_path(batch)).stem:
            continue
        found = fresh_search_rows(embeddings)
        if found is not None and found.rows and found.dim == vectors.shape[1] and stored_models(embeddings) == {model}:
            others.append(found)
    collection_rows = len(vectors) + sum(f.rows for f in others)
    if len(others) > MAX_TRAINING_BATCHES - 1:
        others = [others[i] for i in sorted(rng.choice(len(others), MAX_TRAINING_BATCHES - 1, replace=False))]
    sources = [vectors] + [mapped_rows(f) for f in others]
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
    codec, trained = None, False
    if path.is_file():
        try:
            codec = read_faiss_file(path, ANN_CODEC)
        except DamagedFileError as exc:  # trained again below, from the collection as it is now
            ANN_CODEC.set_aside(path, exc.reason)
            if layout.ann_codec_note_path(model).is_file():
                move_aside(layout.ann_codec_note_path(model))
    if codec is None:
        if not path.is_file():
            sample, rows = codec_sample(layout, model, batch, vectors, seed)
            if rows < MIN_ROWS_FOR_IVF:
                return None, None, False, 0
            trained = train_codec(sample, rows, path)
            if trained:
                write_text_atomically(json.dumps({"model": model, "factory": codec_factory(rows, vectors.shape[1]),
                                                  "collection_rows": rows, "sample_rows": len(sample),
                                                  "trained_by": batch}), layout.ann_codec_note_path(model))
        codec = read_faiss_file(path, ANN_CODEC)
    try:
        note = json.loads(layout.ann_codec_note_path(model).read_text())
    except (OSError, ValueError):
        note = {}
    rows = note.get("collection_rows", 0) if isinstance(note, dict) else 0
    return codec, codec_version(layout, model), trained, int(rows) if isinstance(rows, int) else 0


def read_faiss_file(path: Path, artifact, batch: str | None = None):
    """A faiss index file, or DamagedFileError naming it (faiss raises RuntimeError for a file cut short or overwritten)."""
    with artifact.reading(path, batch, READ_ERRORS + (RuntimeError,)):
        return read_faiss(path)


def build_batch_shard(layout: DataLayout, batch: str, seed: int = 0) -> ShardSummary:
    """(Re)build one batch's shard from its embeddings with the model's codec (trained first when the
    collection has none yet and is large enough); the other batches' shards are not touched."""
    embeddings = layout.embeddings_path(batch)
    if not embeddings.is_file():
        raise IndexNotBuiltError(f"No embeddings for batch {batch} at {embeddings}: materialize image_embeddings first.")
    started = time.perf_counter()
    stamp = source_note(embeddings)
    vectors_file = ensure_search_rows(embeddings)  # the float32 rows that candidates are re-ranked from
    models = sorted(stored_models(embeddings)) if vectors_file.rows else []
    if len(models) > 1:
        raise ValueError(f"{embeddings} holds embeddings of several models {models}: re-materialize image_embeddings.")
    model = models[0] if models else ""
    target = layout.ann_shard_path(batch)
    vectors = mapped_rows(vectors_file)
    codec, version_of_codec, trained, codec_rows = model_codec(layout, model, batch, vectors, seed) \
        if vectors_file.rows else (None, None, False, 0)
    if codec is not None:
        fill_shard(codec, vectors, target)
        kind, factory, index_bytes = KIND_IVF, factory_string(codec.nlist, codec.pq.M), target.stat().st_size
    else:
        remove_file(target)
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
        _opened[key] = read_faiss_file(path, ANN_SHARD, Path(path).stem)
    return _opened[key]


def open_batch_shards(layout: DataLayout, batches: list[str],
                      damaged: list[DamagedFileError] | None = None) -> tuple[list[Shard], list[str]]:
    """The fresh shards of `batches`, and the batches without one (missing, stale or damaged: a damaged
    shard is logged as a warning and added to `damaged` when it is given)."""
    shards, without = [], []
    for batch in batches:
        note = read_note(layout, batch)
        if note is None or not is_fresh(layout, batch, note):
            without.append(batch)
            continue
        try:
            vectors = mapped_rows(ensure_search_rows(layout.embeddings_path(batch)))
            index = _open_cached(layout.ann_shard_path(batch), str(note.get("version"))) \
                if note["kind"] == KIND_IVF else None
        except DamagedFileError as exc:
            log.warning("%s", exc)
            if damaged is not None:
                damaged.append(exc)
            without.append(batch)
            continue
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
    damaged: list[DamagedFileError] | None = None,
) -> list[tuple[float, str, str]]:
    """(score, image_id, batch) of the k best, best first: through the shards of the batches that
    have a fresh one, exactly (clip_assets.search.exact_search.top_k_streaming) for the others.
    Damaged files met on the way are added to `damaged` (a damaged shard's batch is searched exactly)."""
    batches = [f.stem for f in files]
    shards, without = open_batch_shards(layout, batches, damaged)
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
        hits += top_k_streaming(query, [layout.embeddings_path(b) for b in without], k, allowed_ids, damaged=damaged)
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
