"""Where each output lives under the data directory: every path below it is built here.

A batch's files are named after the batch. A batch folder's name can take the whole 255-byte
file-name limit, which `<batch>.parquet` would pass, so a name longer than MAX_STEM_BYTES is stored
under a shortened stem: its first bytes, `~`, and a hash of the whole name. The stem of a stem is
itself, so a file's stem (what search reports as the batch) leads back to the same files.

The data directory can be a URL (`s3://bucket/prefix`; clip_assets.storage.object_store): `data_dir`
is then this process's local copy of it, and every path handed out here is first brought up to the
store's object (a file: one HEAD; a folder that is listed: one LIST), so readers read what the store
holds now. `file://` URLs are plain local paths.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from clip_assets.storage import object_store
from clip_assets.storage.atomic_files import sweep_stale_temp_files
from clip_assets.storage.store_urls import is_store_url, local_path

# Leaves room for the longest suffix (`.parquet`, `.parts`) under the 255-byte file-name limit.
MAX_STEM_BYTES = 200
TEXT_QUERY_ENCODERS = "text_query_encoders"  # folders under the data directory
CALIBRATION = "calibration"
_HASH_CHARS = 16


def batch_stem(batch: str) -> str:
    """The batch's name as its files carry it: the name itself, or a shortened one that fits."""
    raw = os.fsencode(batch)
    if len(raw) <= MAX_STEM_BYTES:
        return batch
    digest = hashlib.sha256(raw).hexdigest()[:_HASH_CHARS]
    return raw[: MAX_STEM_BYTES - _HASH_CHARS - 1].decode("utf-8", "ignore") + "~" + digest


@dataclass(frozen=True)
class DataLayout:
    data_dir: Path  # given as a path or a URL; always a local folder once made (a store's local copy)

    def __post_init__(self) -> None:
        location = self.data_dir
        if isinstance(location, str) and is_store_url(location):
            object.__setattr__(self, "data_dir", object_store.open_store(location).local_root)
        elif not isinstance(location, Path):
            object.__setattr__(self, "data_dir", local_path(location))

    @classmethod
    def of_embeddings_file(cls, embeddings_file: Path) -> DataLayout:
        """The layout an embeddings file (`<data dir>/embeddings/<batch>.parquet`) belongs to."""
        return cls(Path(embeddings_file).parent.parent)

    @property
    def store(self) -> object_store.ObjectStore | None:
        """The object store this data directory is a local copy of; None for a plain local one."""
        return object_store.store_for(self.data_dir)

    def _current(self, path: Path) -> Path:
        """`path`, its local copy first brought up to the store's object (a data directory in a store)."""
        store = self.store
        if store is not None:
            store.refresh(path)
        return path

    def _listed(self, folder: Path) -> Path:
        """`folder`, its files first brought up to the store's (a data directory in a store)."""
        store = self.store
        if store is not None:
            store.sync_folder(folder)
        return folder

    @property
    def duckdb_path(self) -> Path:
        """Local only, also for a data directory in a store: the DuckDB file is never published."""
        return self.data_dir / "clip_assets.duckdb"

    @property
    def warehouse_dir(self) -> Path:
        """The warehouse's tables as parquet files, with CLIP_ASSETS_WAREHOUSE=parquet (clip_assets.storage.parquet_warehouse)."""
        return self.data_dir / "warehouse"

    @property
    def manifest_dir(self) -> Path:
        return self.data_dir / "manifest"

    def manifest_path(self, batch: str) -> Path:
        return self._current(self.manifest_dir / f"{batch_stem(batch)}.parquet")

    def manifest_files(self) -> list[Path]:
        """Every batch's manifest, sorted."""
        return sorted(self._listed(self.manifest_dir).glob("*.parquet"))

    @property
    def manifests_glob(self) -> str:
        """Every batch's manifest, as a pattern for DuckDB's read_parquet."""
        return str(self._listed(self.manifest_dir) / "*.parquet")

    @property
    def embeddings_dir(self) -> Path:
        return self.data_dir / "embeddings"

    def embeddings_path(self, batch: str) -> Path:
        return self._current(self.embeddings_dir / f"{batch_stem(batch)}.parquet")

    def embedding_files(self) -> list[Path]:
        """Every batch's embeddings file, sorted; the stem of each is its batch (see batch_stem)."""
        return sorted(self._listed(self.embeddings_dir).glob("*.parquet"))

    def embedding_parts_dir(self, batch: str) -> Path:
        """Chunks of an unfinished embedding run, removed once the batch file is written."""
        return self._listed(self.embeddings_dir / f"{batch_stem(batch)}.parts")

    @property
    def embedding_failures_dir(self) -> Path:
        return self.data_dir / "embedding_failures"

    def embedding_failures_path(self, batch: str) -> Path:
        return self._current(self.embedding_failures_dir / f"{batch_stem(batch)}.parquet")

    @property
    def search_rows_dir(self) -> Path:
        """The search rows (clip_assets.search.search_rows). The folder keeps the name it was first given,
        so the rows already written there stay in use."""
        return self.data_dir / "search_index"

    @property
    def ann_index_dir(self) -> Path:
        return self.data_dir / "ann_index"

    def ann_shard_path(self, batch: str) -> Path:
        """The batch's approximate-nearest-neighbour index shard (faiss)."""
        return self._current(self.ann_index_dir / f"{batch_stem(batch)}.faiss")

    def ann_codec_path(self, model: str) -> Path:
        """The model's trained, empty IVF-PQ index that every batch's shard is filled from."""
        return self._current(self._codec_path(model))

    def _codec_path(self, model: str) -> Path:
        return self.ann_index_dir / f"codec-{hashlib.sha1(model.encode()).hexdigest()[:12]}.faiss"

    def ann_codec_note_path(self, model: str) -> Path:
        """What the model's codec was trained for (model, factory, the collection's rows then)."""
        return self._current(self._codec_path(model).with_suffix(".json"))

    def ann_shard_note_path(self, batch: str) -> Path:
        """What the batch's shard was built from (embeddings file size and mtime), its kind and version."""
        return self._current(self.ann_index_dir / f"{batch_stem(batch)}.json")

    @property
    def duplicate_pairs_dir(self) -> Path:
        return self.data_dir / "near_duplicates" / "pairs"

    def duplicate_pairs_path(self, batch: str) -> Path:
        """Near-duplicate pairs found by querying this batch's images against the whole index."""
        return self._current(self.duplicate_pairs_dir / f"{batch_stem(batch)}.parquet")

    @property
    def copy_threshold_path(self) -> Path:
        """The copy threshold learnt for the collection's model (clip_assets.search.copy_threshold)."""
        return self._current(self.data_dir / "near_duplicates" / "copy_threshold.json")

    @property
    def duplicate_choices_path(self) -> Path:
        """Which file of each duplicate group a person keeps (clip_assets.search.duplicate_choices): a SQLite file."""
        return self.data_dir / "labels" / "duplicate_choices.sqlite"

    def duplicates_page_dir(self, run_id: str) -> Path:
        return self.data_dir / "gallery" / "near_duplicates" / run_id

    @property
    def content_check_position_path(self) -> Path:
        """Where the content check's next slice begins (clip_assets.ingest.content_check)."""
        return self._current(self.data_dir / "content_check_position.json")

    def content_changes_path(self, batch: str) -> Path:
        """Images of a batch whose bytes changed under an unchanged size and mtime, found by the content
        check: the batch's next embedding run encodes them again, then removes the file."""
        return self._current(self.data_dir / "content_changes" / f"{batch_stem(batch)}.json")

    @property
    def rescan_position_path(self) -> Path:
        """Where the re-scan schedule's next slice begins (clip_assets.ingest.batch_discovery.rescan_slice)."""
        return self._current(self.data_dir / "rescan_position.json")

    @property
    def text_query_encoder_dir(self) -> Path:
        """Text towers saved for fast search start-up (clip_assets.search.text_query_encoder)."""
        return self._listed(self.data_dir / TEXT_QUERY_ENCODERS)

    def search_rows_path(self, batch: str) -> Path:
        """The batch's embeddings as raw float32 rows; its note is `search_rows_note_path`."""
        return self._current(self.search_rows_dir / f"{batch_stem(batch)}.f32")

    def search_rows_note_path(self, batch: str) -> Path:
        """What the batch's search rows were made from (clip_assets.search.search_rows)."""
        return self._current(self.search_rows_dir / f"{batch_stem(batch)}.json")

    @property
    def adapters_path(self) -> Path:
        """The category_adapters asset's output; absent: classification is zero-shot."""
        return self._current(self.data_dir / "adapters" / "category_adapters.npz")

    @property
    def fine_tuned_models_dir(self) -> Path:
        """Checkpoints written by `clip-assets fine-tune` and `fine_tuned_model`, each named by its content hash."""
        return self.data_dir / "fine_tuned_models"

    @property
    def fine_tuned_model_in_use_path(self) -> Path:
        """Which of those checkpoints the `fine_tuned_model` asset wrote last (clip_assets.model.fine_tuned_weights)."""
        return self._current(self.fine_tuned_models_dir / "fine_tuned_model.json")

    @property
    def review_labels_path(self) -> Path:
        """The labels people give in the review pages (clip_assets.tuning.review_labels): a SQLite file."""
        return self.data_dir / "labels" / "review_labels.sqlite"

    @property
    def calibration_proposal_path(self) -> Path:
        return self._current(self.data_dir / CALIBRATION / "calibrated_thresholds.toml")

    def gallery_dir(self, run_id: str) -> Path:
        return self.data_dir / "gallery" / run_id

    def sweep_stale_temp_files(self, batch: str | None = None) -> list[Path]:
        """Remove temp files abandoned by dead writers in every output folder (and the batch's parts)."""
        folders = [
            self.manifest_dir, self.embeddings_dir, self.embedding_failures_dir, self.search_rows_dir,
            # Temp files are local: the folders themselves, not brought up to the store first (that would
            # fetch every saved text tower on a machine whose copy is cold).
            self.data_dir / TEXT_QUERY_ENCODERS, self.data_dir / CALIBRATION, self.fine_tuned_models_dir,
        ]
        if batch is not None:
            folders.append(self.embedding_parts_dir(batch))
        return [path for folder in folders for path in sweep_stale_temp_files(folder)]
