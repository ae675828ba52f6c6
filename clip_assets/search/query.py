"""Nearest-neighbour search over the stored image embeddings: text to image and image to image.

A query (a text, an image file or uploaded pixels) is checked, encoded by the configured model (or
by the text tower an earlier search saved, clip_assets.search.text_query_encoder), and answered
exactly (clip_assets.search.exact_search) below `exact_search_below` stored embeddings, else through
the approximate index's shards (clip_assets.search.ann_index); the hits are named by the manifests.

A batch whose embeddings file (or index shard, or manifest) is damaged is left out with a warning,
handed back to the caller (`damaged`) so the command line and the search page show it, and the other
batches are searched (clip_assets.storage.damaged_files).

Hits are ordered by score, best first, and equal scores by image_id, everywhere a top-k is taken:
so the first 3 hits of a search for 5 are the hits of the same search for 3, and two copies of the
same picture always come out in the same order.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import Settings
from clip_assets.embedding.decode import decode_image
from clip_assets.ingest.manifest import image_paths
from clip_assets.model.fine_tuned_weights import configured_weights
from clip_assets.search.ann_index import approximate_top_k
from clip_assets.search.exact_search import (
    DEFAULT_RECORD_BATCH_ROWS,
    NothingToSearchError,
    SearchQueryError,
    check_query_model,
    embedding_files,
    top_k_streaming,
)
from clip_assets.storage.damaged_files import DamagedFileError

if TYPE_CHECKING:  # torch and open_clip load only when a query is encoded
    from clip_assets.model.clip_model import ClipModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchHit:
    image_id: str
    path: str
    batch: str
    score: float

    def as_dict(self) -> dict:
        return asdict(self)


def images_matching_category(layout: DataLayout, category: str, batches: list[str] | None = None) -> set[str]:
    """image_ids whose classification matched `category` (in the given batches)."""
    # deferred: the warehouse module loads torch (through the centroids), which a search without a
    # category filter need not wait for before the query is checked
    from clip_assets.storage.warehouse import connect
    from clip_assets.storage.warehouse import exists as warehouse_exists

    if not warehouse_exists(layout.duckdb_path):
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


def decode_query_image(data: bytes, name: str) -> Image.Image:
    """An image query's pixels, decoded as the pipeline decodes stored images, or a SearchQueryError."""
    if not data:
        raise SearchQueryError(f"{name} is empty, not an image.")
    try:
        return decode_image(data)
    except UnidentifiedImageError as exc:
        raise SearchQueryError(f"{name} is not an image file (Pillow does not recognise its format).") from exc
    except Exception as exc:  # truncated and malformed files, decompression bombs
        raise SearchQueryError(f"{name} is not an image that can be read: {type(exc).__name__}: {exc}") from exc


def read_query_image(image: Path | str, image_root: Path) -> Image.Image:
    """The pixels of the file an image query names (see `resolve_query_image`)."""
    path = resolve_query_image(image, image_root)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SearchQueryError(f"{path} cannot be read: {exc.strerror or exc}") from exc
    return decode_query_image(data, str(path))


def encode_text_query(clip: "ClipModel", text: str) -> np.ndarray:
    return clip.encode_texts([text]).numpy()[0]


def encode_image_query(clip: "ClipModel", image: Image.Image) -> np.ndarray:
    pixels = clip.preprocess(image).unsqueeze(0)
    return clip.encode_image_tensors(pixels).numpy()[0]


def query_encoder(settings: Settings, layout: DataLayout, identity: str, text_only: bool):
    """What encodes the query: for a text, the text tower saved by an earlier search when there is one
    (no open_clip import, see clip_assets.search.text_query_encoder); else the model, whose text tower is
    then saved for the next text search."""
    # deferred: both load torch, which `clip-assets search` imports only once the query is checked
    from clip_assets.model.clip_model import import_open_clip, load_clip_model
    from clip_assets.search import text_query_encoder

    if text_only and settings.device in (None, "", "cpu"):
        saved = text_query_encoder.load_text_query_encoder(layout.text_query_encoder_dir, identity)
        if saved is not None:
            return saved
    import_open_clip(settings.model, skip_unused_timm=True)  # timm only for a timm tower (see there)
    clip = load_clip_model(settings.model, configured_weights(settings), settings.device)
    if text_only and clip.identity == identity:
        text_query_encoder.save_text_query_encoder(clip, layout.text_query_encoder_dir)
    return clip


class QueryModel:
    """The model a search process that stays up holds (the app): the text tower alone until an image
    query needs the image tower.

    Text queries go through the text tower a search saved (clip_assets.search.text_query_encoder:
    torch and the tower, without open_clip, torchvision or the image tower). Where none was saved yet,
    the model is loaded once, its text tower saved, and the model let go for the saved tower; where
    none can be saved (a GPU, another tokenizer), the model stays and answers both. The first image
    query loads the whole model, once. `identity`: the configured weights' model identity.
    """

    def __init__(self, settings: Settings, identity: str):
        from clip_assets.search import text_query_encoder  # deferred: it loads torch

        self.settings, self.identity = settings, identity
        layout = DataLayout(settings.data_dir)
        text = query_encoder(settings, layout, identity, text_only=True)
        if not isinstance(text, text_query_encoder.TextQueryEncoder):  # the model: its text tower was just saved
            text = text_query_encoder.load_text_query_encoder(layout.text_query_encoder_dir, identity) or text
        self.text = text
        self._whole = None if isinstance(text, text_query_encoder.TextQueryEncoder) else text
        self._loading = threading.Lock()

    @property
    def image_tower_loaded(self) -> bool:
        return self._whole is not None

    def whole_model(self) -> ClipModel:
        with self._loading:
            if self._whole is None:
                self._whole = query_encoder(self.settings, DataLayout(self.settings.data_dir), self.identity, False)
            return self._whole

    def encode_texts(self, texts: list[str]):
        return self.text.encode_texts(texts)

    def preprocess(self, image: Image.Image):
        return self.whole_model().preprocess(image)

    def encode_image_tensors(self, pixels):
        return self.whole_model().encode_image_tensors(pixels)


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
    image: Path | str | Image.Image | None = None,
    k: int = 10,
    batches: list[str] | None = None,
    category: str | None = None,
    clip: "ClipModel | None" = None,
    record_batch_rows: int = DEFAULT_RECORD_BATCH_ROWS,
    timings: dict[str, float] | None = None,
    exact: bool = False,
    damaged: list[DamagedFileError] | None = None,
) -> list[SearchHit]:
    """The k stored images most similar to a text or an image, best first (equal scores by image_id).

    `image` is a file (absolute, or relative to the current directory or to the image root) or
    decoded pixels (an upload). The query, the stored embeddings' model identity and the image are
    checked before the model is loaded, so a mistake fails fast; pass `clip` to reuse a loaded model.
    `timings`, when given, receives the seconds spent loading the model, encoding and scanning.
    Below `settings.exact_search_below` stored embeddings, or with `exact`, every embedding is scored;
    above, the index shards answer (clip_assets.search.ann_index), batches without a fresh shard being
    scored exactly. `damaged`, when given, receives the damaged files that were left out (each also
    logged as a warning); when every file to search is damaged, the first one's DamagedFileError is raised.
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
    from clip_assets.model.clip_model import model_identity  # deferred: it loads torch (see query_encoder)

    identity = clip.identity if clip is not None else model_identity(settings.model, configured_weights(settings))
    searchable = check_query_model(files, identity)  # each file's footer read once: models, rows, or damage
    damaged = [] if damaged is None else damaged
    damaged += searchable.damaged
    if not searchable.files:
        raise searchable.damaged[0]
    files = searchable.files
    allowed = images_matching_category(layout, category, batches) if category else None
    timings = {} if timings is None else timings
    started = time.perf_counter()
    if clip is None:
        clip = query_encoder(settings, layout, identity, text_only=image is None)
    loaded = time.perf_counter()
    query = encode_text_query(clip, text) if text is not None else encode_image_query(clip, image)
    encoded = time.perf_counter()
    if exact or searchable.rows < settings.exact_search_below:
        best = top_k_streaming(query, files, k, allowed, record_batch_rows, damaged=damaged)
    else:
        best = approximate_top_k(layout, files, query, k, allowed, nprobe=settings.ann_nprobe, damaged=damaged)
    ids_by_batch: dict[str, list[str]] = {}
    for _, image_id, batch in best:
        ids_by_batch.setdefault(batch, []).append(image_id)
    paths = image_paths(layout, ids_by_batch, damaged)
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
