"""The embedding step as a plain function: encode what is new in a batch and write its embeddings.

The Dagster assets call these and turn the returned summaries into materialization metadata; tests
call them directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from clip_assets.config.layout import DataLayout
from clip_assets.embedding.engine import FAILURES_SCHEMA, embeddings_schema, encode_images
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.store import BackgroundWrites, EmbeddingFileFigures, PartFiles, plan_encoding, write_final
from clip_assets.ingest.content_check import clear_content_changes, read_content_changes
from clip_assets.model.clip_model import ClipModel
from clip_assets.storage.atomic_files import write_parquet_atomically
from clip_assets.storage.damaged_files import EMBEDDINGS, MANIFEST, DamagedFileError
from clip_assets.storage.store_root import StoreRoot


@dataclass
class EmbeddingSummary:
    path: Path
    rows: int  # images in the batch file now
    encoded: int  # decoded and run through the model in this run
    carried_over: int  # unchanged since the previous run: not read at all
    unchanged_content: int  # size or mtime changed, content did not: read and hashed, not decoded
    resumed: int  # finished by an interrupted run, taken from its part files
    dropped: int  # no longer in the manifest
    failed: int
    usable: int  # files the manifest found worth opening (stat alone: some may fail to decode)
    model: str
    dim: int
    failures: dict[str, str] = field(default_factory=dict)
    figures: EmbeddingFileFigures = field(default_factory=EmbeddingFileFigures)  # of the file, counted as written

    @property
    def failure_share(self) -> float:
        return self.failed / self.usable if self.usable else 0.0


def write_embeddings(
    clip: ClipModel,
    image_root: Path | StoreRoot,
    layout: DataLayout,
    batch: str,
    options: EncodeOptions = EncodeOptions(),
    report: Callable[[str], None] = logging.getLogger(__name__).info,
) -> EmbeddingSummary:
    """Encode what is new or changed since the last run of this model; resume an interrupted run.

    A previous embeddings file that cannot be read is moved aside (clip_assets.storage.damaged_files)
    and the batch encoded afresh; a damaged manifest fails, naming the command that rebuilds it.
    """
    layout.sweep_stale_temp_files(batch)
    with MANIFEST.reading(layout.manifest_path(batch), batch):
        manifest = pq.read_table(layout.manifest_path(batch))
    path = layout.embeddings_path(batch)
    try:
        return _encode_batch(clip, image_root, layout, batch, manifest, options, report)
    except DamagedFileError as exc:
        if exc.path != path or not path.is_file():
            raise
        # what this attempt encoded is in its part files: the second one resumes from them
        report(EMBEDDINGS.set_aside(path, exc.reason, batch))
        return _encode_batch(clip, image_root, layout, batch, manifest, options, report)


def _encode_batch(clip: ClipModel, image_root: Path | StoreRoot, layout: DataLayout, batch: str, manifest: pa.Table,
                  options: EncodeOptions, report: Callable[[str], None]) -> EmbeddingSummary:
    path = layout.embeddings_path(batch)
    parts = PartFiles(layout.embedding_parts_dir(batch), clip.identity, clip.computed_precision)
    parts.discard_other_models()
    plan = plan_encoding(manifest, path, parts, read_content_changes(layout, batch))
    report(
        f"{batch}: {len(plan.job.image_ids):,} images to encode, "
        f"{len(plan.carried_ids):,} unchanged, {len(plan.resumed_ids):,} resumed"
    )
    before = image_root.requests.snapshot() if isinstance(image_root, StoreRoot) else None
    with BackgroundWrites(parts.write) as write_chunk:  # parquet is written while the model goes on
        result = encode_images(clip, image_root, plan.job, write_chunk, options, report)
    if before is not None:
        made = image_root.requests.since(before)
        report(f"{batch}: requests to {image_root}: " + ", ".join(f"{n:,} {k.upper()}" for k, n in made.items() if n))
    failures = pa.table(
        {k: [f[n] for f in result.failures] for n, k in enumerate(FAILURES_SCHEMA.names)}, schema=FAILURES_SCHEMA
    )
    write_parquet_atomically(failures, layout.embedding_failures_path(batch))
    figures = write_final(path, embeddings_schema(clip.embed_dim), plan, parts)
    parts.remove()
    clear_content_changes(layout, batch)  # compared again above: encoded anew where the bytes differ
    return EmbeddingSummary(
        path=path,
        rows=figures.rows,
        encoded=result.encoded,
        carried_over=len(plan.carried_ids),
        unchanged_content=result.unchanged_content,
        resumed=len(plan.resumed_ids),
        dropped=plan.dropped,
        failed=len(result.failures),
        usable=len(plan.keep_ids),
        model=clip.identity,
        dim=clip.embed_dim,
        failures={p: e for _, p, e in result.failures[:20]},
        figures=figures,
    )

