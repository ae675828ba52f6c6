"""Nearest-neighbour search over the stored image embeddings: text to image and image to image.

Exact search: every stored embedding is scored against the query (cosine similarity, as a dot
product of unit vectors). The per-batch parquet files are read one record batch at a time and a
running top-k is kept with `numpy.argpartition`, so memory stays bounded by one record batch plus k
candidates however large the collection is. The query is encoded by the configured model, and search
refuses embeddings that carry another model's identity: similarities across models mean nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_assets.clip_model import ClipModel, model_identity
from clip_assets.embedding import load_rgb
from clip_assets.layout import DataLayout
from clip_assets.settings import Settings

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


class RunningTopK:
    """The k best (score, image_id, batch) seen so far, folded in one chunk at a time."""

    def __init__(self, k: int):
        self.k = k
        self.scores = np.empty(0, dtype=np.float32)
        self.ids: list[str] = []
        self.batches: list[str] = []

    def add(self, scores: np.ndarray, image_ids: pa.Array, batch: str) -> None:
        if len(scores) == 0:
            return
        take = min(self.k, len(scores))
        best = np.argpartition(-scores, take - 1)[:take] if take < len(scores) else np.arange(len(scores))
        # Only the chunk's own best can enter the running top-k, and only those above its floor.
        if len(self.scores) >= self.k:
            best = best[scores[best] > self.scores.min()]
            if len(best) == 0:
                return
        merged_scores = np.concatenate([self.scores, scores[best]])
        merged_ids = self.ids + image_ids.take(pa.array(best)).to_pylist()
        merged_batches = self.batches + [batch] * len(best)
        if len(merged_scores) > self.k:
            keep = np.argpartition(-merged_scores, self.k - 1)[: self.k]
        else:
            keep = np.arange(len(merged_scores))
        self.scores = merged_scores[keep]
        self.ids = [merged_ids[i] for i in keep]
        self.batches = [merged_batches[i] for i in keep]

    def best_first(self) -> list[tuple[float, str, str]]:
        order = sorted(range(len(self.scores)), key=lambda i: (-float(self.scores[i]), self.ids[i]))
        return [(float(self.scores[i]), self.ids[i], self.batches[i]) for i in order]


def top_k_streaming(
    query: np.ndarray,
    files: list[Path],
    k: int,
    allowed_ids: set[str] | None = None,
    record_batch_rows: int = DEFAULT_RECORD_BATCH_ROWS,
) -> list[tuple[float, str, str]]:
    """(score, image_id, batch) of the k stored embeddings most similar to `query`, best first.

    Reads each file in record batches of `record_batch_rows`; `allowed_ids` restricts the candidates
    (a category filter). The batch is the file's stem, as the layout names it.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    query = np.asarray(query, dtype=np.float32).reshape(-1)
    allowed = pa.array(sorted(allowed_ids), pa.string()) if allowed_ids is not None else None
    top = RunningTopK(k)
    for path in files:
        pf = pq.ParquetFile(path)
        dim = pf.schema_arrow.field("embedding").type.list_size
        if dim != query.shape[0]:
            raise SearchModelMismatchError(
                f"{path} holds embeddings of dimension {dim}, the query has {query.shape[0]}."
            )
        for rb in pf.iter_batches(batch_size=record_batch_rows, columns=["image_id", "embedding"]):
            ids = rb.column("image_id")
            embeddings = rb.column("embedding")
            if allowed is not None:
                keep = pc.is_in(ids, value_set=allowed)
                ids, embeddings = ids.filter(keep), embeddings.filter(keep)
            top.add(_matrix(embeddings) @ query, ids, path.stem)
    return top.best_first()


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


def encode_text_query(clip: ClipModel, text: str) -> np.ndarray:
    return clip.encode_texts([text]).numpy()[0]


def encode_image_query(clip: ClipModel, path: Path) -> np.ndarray:
    pixels = clip.preprocess(load_rgb(path)).unsqueeze(0)
    return clip.encode_image_tensors(pixels).numpy()[0]


def search(
    settings: Settings,
    text: str | None = None,
    image: Path | None = None,
    k: int = 10,
    batches: list[str] | None = None,
    category: str | None = None,
    clip: ClipModel | None = None,
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
    identity = clip.identity if clip is not None else model_identity(settings.model, settings.pretrained)
    check_query_model(files, identity)
    allowed = images_matching_category(layout, category, batches) if category else None
    if clip is None:
        from clip_assets.clip_model import load_clip_model

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
