"""Nearest-neighbour search over the stored image embeddings: text to image and image to image.

Exact search: every stored embedding is scored against the query (cosine similarity, as a dot
product of unit vectors). The per-batch parquet files are read one record batch at a time and a
running top-k is kept with `numpy.argpartition`, so memory stays bounded by one record batch plus k
candidates however large the collection is. The query is encoded by the configured model, and search
refuses embeddings that carry another model's identity: similarities across models mean nothing.

Hits are ordered by score, best first, and equal scores by image_id, everywhere a top-k is taken:
so the first 3 hits of a search for 5 are the hits of the same search for 3, and two copies of the
same picture always come out in the same order.
"""

from __future__ import annotations

import functools
import json
import logging
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_assets.storage.arrow_vectors import vectors_matrix as _matrix
from clip_assets.storage.atomic_files import atomic_write, write_text_atomically
from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import Settings
from clip_assets.ingest.manifest import image_paths

if TYPE_CHECKING:  # torch and open_clip load only when a query is encoded
    from PIL import Image

    from clip_assets.model.clip_model import ClipModel

log = logging.getLogger(__name__)

DEFAULT_RECORD_BATCH_ROWS = 65_536  # 128 MiB of float32 at dimension 512


class SearchModelMismatchError(ValueError):
    """The stored embeddings were made by another model than the one that would encode the query."""


class NothingToSearchError(LookupError):
    """No embeddings (or no batch or category of the given name) to search."""


class SearchQueryError(ValueError):
    """A query that cannot be searched for: an empty text, k below 1, or an image that can't be read."""


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
                f"'{identity}' (CLIP_ASSETS_MODEL / CLIP_ASSETS_PRETRAINED, or CLIP_ASSETS_USE_FINE_TUNED). Similarities across models "
                "mean nothing, so nothing was searched: set the model that made the embeddings, or "
                "re-materialize image_embeddings with this one."
            )


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
    return DataLayout.of_embeddings_file(embeddings_file).search_index_path(embeddings_file.stem)


def _source_note(embeddings_file: Path) -> dict:
    st = embeddings_file.stat()
    return {"source": embeddings_file.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fresh_search_index(embeddings_file: Path) -> SearchIndexFile | None:
    """The index of one embeddings file when it is written and matches the file as it is now, else None."""
    data = index_path(embeddings_file)
    note_path = data.with_suffix(".json")
    if note_path.is_file() and data.is_file():
        source = _source_note(embeddings_file)
        note = json.loads(note_path.read_text())
        if {k: note.get(k) for k in source} == source and data.stat().st_size == note["rows"] * note["dim"] * 4:
            return SearchIndexFile(data, note["rows"], note["dim"])
    return None


def ensure_search_index(embeddings_file: Path, record_batch_rows: int = DEFAULT_RECORD_BATCH_ROWS) -> SearchIndexFile:
    """The index of one embeddings file, (re)built from the parquet file when missing or stale."""
    found = fresh_search_index(embeddings_file)
    if found is not None:
        return found
    data = index_path(embeddings_file)
    note_path = data.with_suffix(".json")
    source = _source_note(embeddings_file)
    pf = pq.ParquetFile(embeddings_file)
    dim = pf.schema_arrow.field("embedding").type.list_size
    rows = 0
    with atomic_write(data) as tmp, open(tmp, "wb") as out:
        for rb in pf.iter_batches(batch_size=record_batch_rows, columns=["embedding"]):
            matrix = np.ascontiguousarray(_matrix(rb.column("embedding")), dtype=np.float32)
            out.write(matrix.tobytes())
            rows += len(matrix)
    write_text_atomically(json.dumps({**source, "rows": rows, "dim": dim}), note_path)
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
    use_index: bool = True,
    threads: int | None = None,
) -> list[tuple[float, str, str]]:
    """(score, image_id, batch) of the k stored embeddings most similar to `query`, best first
    (equal scores by image_id).

    Each file is read a chunk of `record_batch_rows` at a time: from its search index (built on
    first use), or straight from the parquet file when `use_index` is False or the index cannot be
    written. `allowed_ids` restricts the candidates (a category filter). Files are spread over
    `threads` (default: the core count). The batch is the file's stem, as the layout names it.
    """
    if k < 1:
        raise SearchQueryError(f"k must be at least 1 (got {k})")
    query = np.asarray(query, dtype=np.float32).reshape(-1)
    allowed = pa.array(sorted(allowed_ids), pa.string()) if allowed_ids is not None else None
    columns = [functools.cache(lambda path=path: pq.read_table(path, columns=["image_id"])["image_id"].combine_chunks())
               for path in files]  # each file's image_id column, read once and only where needed
    ids_of = {n: (lambda rows, column=column: column().take(pa.array(rows)).to_numpy(zero_copy_only=False))
              for n, column in enumerate(columns)}

    def one_file(file_no: int) -> RunningTopK:
        path = files[file_no]
        dim = pq.ParquetFile(path).schema_arrow.field("embedding").type.list_size
        if dim != query.shape[0]:
            raise SearchModelMismatchError(f"{path} holds embeddings of dimension {dim}, the query has {query.shape[0]}.")
        top = RunningTopK(k, ids_of)
        keep = None
        if allowed is not None:
            keep = pc.is_in(columns[file_no](), value_set=allowed).to_numpy(zero_copy_only=False)
            if not keep.any():
                return top
        chunks = _parquet_scores(path, query, record_batch_rows)
        if use_index:
            try:
                chunks = _index_scores(ensure_search_index(path, record_batch_rows), query, record_batch_rows)
            except OSError as exc:  # a read-only data directory: search the parquet file itself
                log.warning("no search index for %s (%s); reading the parquet file", path, exc)
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


def images_matching_category(layout: DataLayout, category: str, batches: list[str] | None = None) -> set[str]:
    """image_ids whose classification matched `category` (in the given batches)."""
    from clip_assets.storage.warehouse import connect

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


def resolve_query_image(image: Path | str, image_root: Path, cwd: Path | None = None) -> Path:
    """The file an image query names: an absolute path, or a path relative to the current directory or
    to the image root (as search prints it), the one that exists; the current directory first."""
    given = Path(image).expanduser()
    if given.is_absolute():
        candidates = [given]
    else:
        candidates = [(cwd or Path.cwd()) / given, Path(image_root) / given]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    for candidate in candidates:
        if candidate.is_dir():
            raise SearchQueryError(f"{candidate} is a folder: give one image file to find images like it.")
    where = str(given) if given.is_absolute() else f"{given} (looked in {candidates[0].parent} and in {candidates[1].parent})"
    raise SearchQueryError(f"No image file {where}; paths may be relative to CLIP_ASSETS_IMAGE_ROOT as search prints them.")


def decode_query_image(data: bytes, name: str) -> "Image.Image":
    """An image query's pixels, decoded as the pipeline decodes stored images, or a SearchQueryError."""
    from PIL import UnidentifiedImageError

    from clip_assets.embedding.engine import decode_image

    if not data:
        raise SearchQueryError(f"{name} is empty, not an image.")
    try:
        return decode_image(data)
    except UnidentifiedImageError as exc:
        raise SearchQueryError(f"{name} is not an image file (Pillow does not recognise its format).") from exc
    except Exception as exc:  # truncated and malformed files, decompression bombs
        raise SearchQueryError(f"{name} is not an image that can be read: {type(exc).__name__}: {exc}") from exc


def read_query_image(image: Path | str, image_root: Path) -> "Image.Image":
    """The pixels of the file an image query names (see `resolve_query_image`)."""
    path = resolve_query_image(image, image_root)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SearchQueryError(f"{path} cannot be read: {exc.strerror or exc}") from exc
    return decode_query_image(data, str(path))


def encode_text_query(clip: "ClipModel", text: str) -> np.ndarray:
    return clip.encode_texts([text]).numpy()[0]


def encode_image_query(clip: "ClipModel", image: "Image.Image") -> np.ndarray:
    pixels = clip.preprocess(image).unsqueeze(0)
    return clip.encode_image_tensors(pixels).numpy()[0]


def query_encoder(settings: Settings, layout: DataLayout, identity: str, text_only: bool):
    """What encodes the query: for a text, the text tower saved by an earlier search when there is one
    (no open_clip import, see clip_assets.search.text_query_encoder); else the model, whose text tower is
    then saved for the next text search."""
    from clip_assets.search import text_query_encoder
    from clip_assets.model.clip_model import import_open_clip, load_clip_model
    from clip_assets.model.fine_tuned_weights import configured_weights

    if text_only and settings.device in (None, "", "cpu"):
        saved = text_query_encoder.load_text_query_encoder(layout.text_query_encoder_dir, identity)
        if saved is not None:
            return saved
    import_open_clip(settings.model, skip_unused_timm=True)  # timm only for a timm tower (see there)
    clip = load_clip_model(settings.model, configured_weights(settings), settings.device)
    if text_only and clip.identity == identity:
        text_query_encoder.save_text_query_encoder(clip, layout.text_query_encoder_dir)
    return clip


def check_query(text: str | None, image: object, k: int) -> None:
    """Refuse a query that cannot be searched for, before anything is read or loaded."""
    if (text is None) == (image is None):
        raise SearchQueryError("give exactly one of a text query or an image query")
    if text is not None and not text.strip():
        raise SearchQueryError("the text query is empty: describe what to find, e.g. \"a red car\"")
    if k < 1:
        raise SearchQueryError(f"k must be at least 1 (got {k})")


def search(
    settings: Settings,
    text: str | None = None,
    image: "Path | str | Image.Image | None" = None,
    k: int = 10,
    batches: list[str] | None = None,
    category: str | None = None,
    clip: "ClipModel | None" = None,
    record_batch_rows: int = DEFAULT_RECORD_BATCH_ROWS,
    timings: dict[str, float] | None = None,
    exact: bool = False,
) -> list[SearchHit]:
    """The k stored images most similar to a text or an image, best first (equal scores by image_id).

    `image` is a file (absolute, or relative to the current directory or to the image root) or
    decoded pixels (an upload). The query, the stored embeddings' model identity and the image are
    checked before the model is loaded, so a mistake fails fast; pass `clip` to reuse a loaded model.
    `timings`, when given, receives the seconds spent loading the model, encoding and scanning.
    Below `settings.exact_search_below` stored embeddings, or with `exact`, every embedding is scored;
    above, the index shards answer (clip_assets.search.ann_index), batches without a fresh shard being
    scored exactly.
    """
    check_query(text, image, k)
    if isinstance(image, (str, Path)):
        image = read_query_image(image, settings.image_root)
    layout = DataLayout(settings.data_dir)
    files = embedding_files(layout, batches)
    if not files:
        raise NothingToSearchError(
            f"No embeddings under {layout.embeddings_dir}: materialize image_embeddings first "
            "(CLIP_ASSETS_DATA_DIR says where to look)."
        )
    from clip_assets.model.clip_model import model_identity
    from clip_assets.model.fine_tuned_weights import configured_weights

    identity = clip.identity if clip is not None else model_identity(settings.model, configured_weights(settings))
    check_query_model(files, identity)
    allowed = images_matching_category(layout, category, batches) if category else None
    timings = {} if timings is None else timings
    started = time.perf_counter()
    if clip is None:
        clip = query_encoder(settings, layout, identity, text_only=image is None)
    loaded = time.perf_counter()
    query = encode_text_query(clip, text) if text is not None else encode_image_query(clip, image)
    encoded = time.perf_counter()
    if exact or sum(pq.ParquetFile(f).metadata.num_rows for f in files) < settings.exact_search_below:
        best = top_k_streaming(query, files, k, allowed, record_batch_rows)
    else:
        from clip_assets.search.ann_index import approximate_top_k

        best = approximate_top_k(layout, files, query, k, allowed, nprobe=settings.ann_nprobe)
    ids_by_batch: dict[str, list[str]] = {}
    for _, image_id, batch in best:
        ids_by_batch.setdefault(batch, []).append(image_id)
    paths = image_paths(layout, ids_by_batch)
    timings.update(model_load_s=loaded - started, encode_s=encoded - loaded, scan_s=time.perf_counter() - encoded)
    return [SearchHit(image_id, paths.get(image_id, ""), batch, score) for score, image_id, batch in best]


def printable(name: str) -> str:
    """A file name on one terminal line: control characters (newlines, tabs, escapes) as backslash codes."""
    if name.isprintable():
        return name
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in name)


def format_table(hits: list[SearchHit]) -> str:
    """A table a person can read in a terminal, one line per hit whatever the file names hold."""
    if not hits:
        return "no matching images"
    rows = [(printable(h.batch), printable(h.path), h) for h in hits]
    width = max(4, *(len(path) for _, path, _ in rows))
    lines = [f"{'rank':>4}  {'score':>7}  {'batch':<12}  {'path':<{width}}  image_id"]
    for rank, (batch, path, h) in enumerate(rows, 1):
        lines.append(f"{rank:>4}  {h.score:>7.4f}  {batch:<12}  {path:<{width}}  {h.image_id}")
    return "\n".join(lines)
