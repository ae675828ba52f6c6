"""Where each output lives under the data directory, and how a file is replaced without a torn write."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class DataLayout:
    data_dir: Path

    @property
    def duckdb_path(self) -> Path:
        return self.data_dir / "clip_assets.duckdb"

    def manifest_path(self, batch: str) -> Path:
        return self.data_dir / "manifest" / f"{batch}.parquet"

    def embeddings_path(self, batch: str) -> Path:
        return self.data_dir / "embeddings" / f"{batch}.parquet"

    def embedding_parts_dir(self, batch: str) -> Path:
        """Chunks of an unfinished embedding run, removed once the batch file is written."""
        return self.data_dir / "embeddings" / f"{batch}.parts"

    def embedding_failures_path(self, batch: str) -> Path:
        return self.data_dir / "embedding_failures" / f"{batch}.parquet"


def write_parquet_atomically(table: pa.Table, path: Path) -> None:
    """Write next to the target and rename over it, so readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_text_atomically(text: str, path: Path) -> None:
    """Text written next to the target and renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
