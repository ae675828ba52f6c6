"""The manifest step as a plain function: list a batch's files and write its manifest.

The Dagster assets call these and turn the returned summaries into materialization metadata; tests
call them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_assets.config.layout import DataLayout
from clip_assets.ingest.manifest import STATUS_OK, build_manifest
from clip_assets.storage.atomic_files import write_parquet_atomically
from clip_assets.storage.damaged_files import MANIFEST


@dataclass
class ManifestSummary:
    path: Path
    files: int
    usable: int
    unusable: int
    errors: dict[str, str] = field(default_factory=dict)  # relative path -> reason (first few)


def write_manifest(image_root: Path, layout: DataLayout, batch: str) -> ManifestSummary:
    layout.sweep_stale_temp_files()
    table = build_manifest(image_root, batch)
    path = layout.manifest_path(batch)
    write_parquet_atomically(table, path)
    usable = int(pc.sum(pc.equal(table["status"], STATUS_OK)).as_py() or 0)
    bad = table.filter(pc.invert(pc.equal(table["status"], STATUS_OK))).slice(0, 20)
    return ManifestSummary(
        path=path,
        files=table.num_rows,
        usable=usable,
        unusable=table.num_rows - usable,
        errors=dict(zip(bad["path"].to_pylist(), bad["error"].to_pylist())),
    )


def unusable_in_manifest(layout: DataLayout, batch: str) -> int:
    with MANIFEST.reading(layout.manifest_path(batch), batch):
        status = pq.read_table(layout.manifest_path(batch), columns=["status"])["status"]
    return int(pc.sum(pc.not_equal(status, STATUS_OK)).as_py() or 0)

