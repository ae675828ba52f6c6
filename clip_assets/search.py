"""Nearest-neighbour search over the stored image embeddings: text to image and image to image.

Exact search: every stored embedding is scored against the query (cosine similarity, as a dot
product of unit vectors). The per-batch parquet files are read one record batch at a time and a
running top-k is kept with `numpy.argpartition`, so memory stays bounded by one record batch plus k
candidates however large the collection is. The query is encoded by the configured model, and search
refuses embeddings that carry another model's identity: similarities across models mean nothing.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_assets.layout import DataLayout
from clip_assets.settings import Settings

if TYPE_CHECKING:  # torch and open_clip load only when a query is encoded
    from clip_assets.clip_model import ClipModel

log = logging.getLogger(__name__)

DEFAULT_RECORD_BATCH_ROWS = 65_536  # 128 MiB of float32 at dimension 512


class SearchModelMismatchError(ValueError):
    """The stored embeddings were made by another model than the one that would encode the query."""


class NothingToSearchError(LookupError):
    """No embeddings (or no batch or category of the given name) to search."""


@dataclass(frozen=True)
class SearchHit:
    image_id: str
    path: str
    batch: str
    score: float

    def as_dict(self) -> dict:
        return asdict(self)


def embedding_files(layout: DataLayout, batches: list[str] | None = None) -> list[Path]:
    """The per-batch embedding files to search, all of them when `batches` is None."""
    if batches is None:
        return sorted((layout.data_dir / "embeddings").glob("*.parquet"))
    missing = [b for b in batches if not layout.embeddings_path(b).is_file()]
    if missing:
        raise NothingToSearchError(
            f"No embeddings for batch(es) {', '.join(missing)} under {layout.data_dir / 'embeddings'}: "
            "materialize image_embeddings for them first."
        )
    return [layout.embeddings_path(b) for b in batches]


def stored_models(path: Path) -> set[str]:
    """The model identities in an embeddings file, from the row-group statistics when they exist."""
    pf = pq.ParquetFile(path)
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


def check_query_model(files: list[Path], identity: str) -> None:
    for path in files:
        others = stored_models(path) - {identity}
        if others:
            raise SearchModelMismatchError(
                f"{path} holds embeddings made by {sorted(others)}, but the query would be encoded by "
                f"'{identity}' (CLIP_ASSETS_MODEL / CLIP_ASSETS_PRETRAINED). Similarities across models "
                "mean nothing, so nothing was searched: set the model that made the embeddings, or "
                "re-materialize image_embeddings with this one."
            )


def _matrix(column: pa.Array) -> np.ndarray:
    """A fixed-size-list column of float32 as an (n, dim) array, zero-copy where possible."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    values = column.values.slice(column.offset * dim, len(column) * dim)
    return values.to_numpy(zero_copy_only=False).reshape(len(column), dim)


# --- The search index: a plain float32 copy of each embeddings file, read through mmap. -----------
#
# Parquet stores a fixed-size list column with per-value levels, and decoding those costs about a
# second per 100,000 embeddings of dimension 512: too slow for an interactive query over millions.
# So the first search after a batch's embeddings change copies them, streaming, into
# search_index/<batch>.f32 (row-major float32, same row order as the parquet file) with a small JSON
# note of the parquet file it was made from. Later queries map that file and multiply it a chunk at
# a time, handing each chunk's pages back afterwards, so the process's memory stays bounded. The
# parquet file stays the source of truth: an index whose note does not match it is rebuilt.


@dataclass(frozen=True)
class SearchIndexFile:
    path: Path
    rows: int
    dim: int


def index_path(embeddings_file: Path) -> Path:
    return embeddings_file.parent.parent / "search_index" / f"{embeddings_file.stem}.f32"


def _source_note(embeddings_file: Path) -> dict:
    st = embeddings_file.stat()
    return {"source": embeddings_file.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def ensure_search_index(embeddings_file: Path, record_batch_rows: int = DEFAULT_RECORD_BATCH_ROWS) -> SearchIndexFile:
    """The index of one embeddings file, (re)built from the parquet file when missing or stale."""
    data = index_path(embeddings_file)
    note_path = data.with_suffix(".json")
    source = _source_note(embeddings_file)
    if note_path.is_file() and data.is_file():
        note = json.loads(note_path.read_text())
        if {k: note.get(k) for k in source} == source and data.stat().st_size == note["rows"] * note["dim"] * 4:
            return SearchIndexFile(data, note["rows"], note["dim"])
    data.parent.mkdir(parents=True, exist_ok=True)
    pf = pq.ParquetFile(embeddings_file)
    dim = pf.schema_arrow.field("embedding").type.list_size
    tmp = data.with_name(f".{data.name}.{os.getpid()}.tmp")
    rows = 0
    with open(tmp, "wb") as out:
        for rb in pf.iter_batches(batch_size=record_batch_rows, columns=["embedding"]):
            matrix = np.ascontiguousarray(_matrix(rb.column("embedding")), dtype=np.float32)
            out.write(matrix.tobytes())
            rows += len(matrix)
    os.replace(tmp, data)
    tmp_note = note_path.with_name(f".{note_path.name}.{os.getpid()}.tmp")
    tmp_note.write_text(json.dumps({**source, "rows": rows, "dim": dim}))
    os.replace(tmp_note, note_path)
    return SearchIndexFile(data, rows, dim)


def _index_scores(index: SearchIndexFile, query: np.ndarray, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, similarities of the chunk) over the mapped index; pages go back after each chunk.

    No view of the mapping leaves this function, so the mapping can always be closed.
    """
    if index.rows == 0:
        return
    row_bytes = index.dim * 4
    with open(index.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for start in range(0, index.rows, chunk_rows):
            n = min(chunk_rows, index.rows - start)
            view = np.frombuffer(mm, np.float32, n * index.dim, start * row_bytes).reshape(n, index.dim)
            scores = view @ query
            del view
            page_start = start * row_bytes // mmap.PAGESIZE * mmap.PAGESIZE
            if hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_DONTNEED, page_start, (start + n) * row_bytes - page_start)
            yield start, scores


def _parquet_scores(embeddings_file: Path, query: np.ndarray, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, similarities of the chunk) straight from the parquet file, a record batch at a time."""
    start = 0
    for rb in pq.ParquetFile(embeddings_file).iter_batches(batch_size=chunk_rows, columns=["embedding"]):
        scores = _matrix(rb.column("embedding")) @ query
        yield start, scores
        start += len(scores)


class RunningTopK:
    """The k best (score, file number, row) seen so far, folded in one chunk at a time."""

    def __init__(self, k: int):
        self.k = k
        self.scores = np.empty(0, dtype=np.float32)
        self.files = np.empty(0, dtype=np.int64)
        self.rows = np.empty(0, dtype=np.int64)

    def add(self, scores: np.ndarray, file_no: int, first_row: int) -> None:
        if len(scores) == 0:
            return
        take = min(self.k, len(scores))
        best = np.argpartition(-scores, take - 1)[:take] if take < len(scores) else np.arange(len(scores))
        # Only the chunk's own best can enter the running top-k, and only those above its floor.
        if len(self.scores) >= self.k:
            best = best[scores[best] > self.scores.min()]
        best = best[np.isfinite(scores[best])]  # -inf marks rows a filter left out
        if len(best) == 0:
            return
        self.merge(scores[best], np.full(len(best), file_no), best + first_row)

    def merge(self, scores: np.ndarray, files: np.ndarray, rows: np.ndarray) -> None:
        scores = np.concatenate([self.scores, scores])
        files = np.concatenate([self.files, files])
        rows = np.concatenate([self.rows, rows])
        keep = np.argpartition(-scores, self.k - 1)[: self.k] if len(scores) > self.k else slice(None)
        self.scores, self.files, self.rows = scores[keep], files[keep], rows[keep]


def top_k_streaming(
    query: np.ndarray,
    files: list[Path],
    k: int,
    allowed_ids: set[str] | None = None,
    record_batch_rows: int = DEFAULT_RECORD_BATCH_ROWS,
    use_index: bool = True,
    threads: int | None = None,
) -> list[tuple[float, str, str]]:
    """(score, image_id, batch) of the k stored embeddings most similar to `query`, best first.

    Each file is read a chunk of `record_batch_rows` at a time: from its search index (built on
    first use), or straight from the parquet file when `use_index` is False or the index cannot be
    written. `allowed_ids` restricts the candidates (a category filter). Files are spread over
    `threads` (default: the core count). The batch is the file's stem, as the layout names it.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    query = np.asarray(query, dtype=np.float32).reshape(-1)
    allowed = pa.array(sorted(allowed_ids), pa.string()) if allowed_ids is not None else None

    def one_file(file_no: int) -> RunningTopK:
        path = files[file_no]
        dim = pq.ParquetFile(path).schema_arrow.field("embedding").type.list_size
        if dim != query.shape[0]:
            raise SearchModelMismatchError(f"{path} holds embeddings of dimension {dim}, the query has {query.shape[0]}.")
        keep = None
        if allowed is not None:
            ids = pq.read_table(path, columns=["image_id"])["image_id"]
            keep = pc.is_in(ids, value_set=allowed).to_numpy(zero_copy_only=False)
            if not keep.any():
                return RunningTopK(k)
        chunks = _parquet_scores(path, query, record_batch_rows)
        if use_index:
            try:
                chunks = _index_scores(ensure_search_index(path, record_batch_rows), query, record_batch_rows)
            except OSError as exc:  # a read-only data directory: search the parquet file itself
                log.warning("no search index for %s (%s); reading the parquet file", path, exc)
        top = RunningTopK(k)
        for start, scores in chunks:
            if keep is not None:
                scores = np.where(keep[start : start + len(scores)], scores, -np.inf).astype(np.float32)
            top.add(scores, file_no, start)
        return top

    workers = max(1, min(len(files), threads or os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # numpy and the file reads release the GIL
        partial = list(pool.map(one_file, range(len(files))))
    top = RunningTopK(k)
    for p in partial:
        if len(p.scores):
            top.merge(p.scores, p.files, p.rows)
    found: dict[int, pa.ChunkedArray] = {}
    hits = []
    for score, file_no, row in zip(top.scores.tolist(), top.files.tolist(), top.rows.tolist()):
        if file_no not in found:
            found[file_no] = pq.read_table(files[file_no], columns=["image_id"])["image_id"]
        hits.append((score, found[file_no][row].as_py(), files[file_no].stem))
    return sorted(hits, key=lambda h: (-h[0], h[1]))


def image_paths(layout: DataLayout, ids_by_batch: dict[str, list[str]]) -> dict[str, str]:
    """image_id -> path relative to the image root, from the batches' manifests."""
    paths: dict[str, str] = {}
    for batch, ids in ids_by_batch.items():
        manifest = layout.manifest_path(batch)
        if not manifest.is_file():
            continue
        table = pq.read_table(manifest, columns=["image_id", "path"], filters=[("image_id", "in", ids)])
        paths.update(zip(table["image_id"].to_pylist(), table["path"].to_pylist()))
    return paths


def images_matching_category(layout: DataLayout, category: str, batches: list[str] | None = None) -> set[str]:
    """image_ids whose classification matched `category` (in the given batches)."""
    from clip_assets.warehouse import connect

    if not layout.duckdb_path.is_file():
        raise NothingToSearchError(f"No DuckDB file at {layout.duckdb_path}: classify images before filtering by category.")
    with connect(layout.duckdb_path, read_only=True) as con:
        known = {r[0] for r in con.execute("SELECT DISTINCT category FROM image_classifications").fetchall()}
        if category not in known:
            raise NothingToSearchError(
                f"No classifications for category '{category}'; known categories: {', '.join(sorted(known)) or 'none'}."
            )
        sql = "SELECT DISTINCT image_id FROM image_classifications WHERE matched AND category = ?"
        params: list = [category]
        if batches is not None:
            sql += " AND list_contains(?, batch)"
            params.append(batches)
        return {r[0] for r in con.execute(sql, params).fetchall()}


def encode_text_query(clip: "ClipModel", text: str) -> np.ndarray:
    return clip.encode_texts([text]).numpy()[0]


def encode_image_query(clip: "ClipModel", path: Path) -> np.ndarray:
    from clip_assets.embedding import load_rgb

    pixels = clip.preprocess(load_rgb(path)).unsqueeze(0)
    return clip.encode_image_tensors(pixels).numpy()[0]


def search(
    settings: Settings,
    text: str | None = None,
    image: Path | None = None,
    k: int = 10,
    batches: list[str] | None = None,
    category: str | None = None,
    clip: "ClipModel | None" = None,
    record_batch_rows: int = DEFAULT_RECORD_BATCH_ROWS,
) -> list[SearchHit]:
    """The k stored images most similar to a text or an image, best first.

    The model identity is checked against the stored embeddings before the model is loaded, so a
    mismatch fails fast; pass `clip` to reuse a loaded model.
    """
    if (text is None) == (image is None):
        raise ValueError("give exactly one of a text query or an image query")
    layout = DataLayout(settings.data_dir)
    files = embedding_files(layout, batches)
    if not files:
        raise NothingToSearchError(
            f"No embeddings under {layout.data_dir / 'embeddings'}: materialize image_embeddings first "
            "(CLIP_ASSETS_DATA_DIR says where to look)."
        )
    from clip_assets.clip_model import load_clip_model, model_identity

    identity = clip.identity if clip is not None else model_identity(settings.model, settings.pretrained)
    check_query_model(files, identity)
    allowed = images_matching_category(layout, category, batches) if category else None
    if clip is None:
        clip = load_clip_model(settings.model, settings.pretrained, settings.device)
    query = encode_text_query(clip, text) if text is not None else encode_image_query(clip, Path(image))
    best = top_k_streaming(query, files, k, allowed, record_batch_rows)
    ids_by_batch: dict[str, list[str]] = {}
    for _, image_id, batch in best:
        ids_by_batch.setdefault(batch, []).append(image_id)
    paths = image_paths(layout, ids_by_batch)
    return [SearchHit(image_id, paths.get(image_id, ""), batch, score) for score, image_id, batch in best]


def format_table(hits: list[SearchHit]) -> str:
    """A table a person can read in a terminal."""
    if not hits:
        return "no matching images"
    width = max(4, *(len(h.path) for h in hits))
    lines = [f"{'rank':>4}  {'score':>7}  {'batch':<12}  {'path':<{width}}  image_id"]
    for rank, h in enumerate(hits, 1):
        lines.append(f"{rank:>4}  {h.score:>7.4f}  {h.batch:<12}  {h.path:<{width}}  {h.image_id}")
    return "\n".join(lines)
