"""Where the review pages' labels meet the labels file and the pipeline.

- `export_labels` / `import_labels`: the labels store's verdicts as a labels file (the format
  CLIP_ASSETS_LABELS reads, clip_assets.tuning.labels_file), and a labels file as verdicts;
- `combined_labels` / `combined_version`: the labels file and the store together, as calibration,
  evaluation and the adapters read them (the store wins where both judge an image on a category);
- `batch_verdicts`: a batch's yes and no by image id, which classification applies over the scores.

The store itself is clip_assets.tuning.review_labels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from clip_assets.config.layout import DataLayout
from clip_assets.ingest.manifest import image_id_for, readable_manifests
from clip_assets.storage.file_hashes import SOURCE_VERSION_CHARS, content_digest
from clip_assets.storage.warehouse_schema import scratch
from clip_assets.tuning.labels_file import LabelRows, read_labels_file, write_labels_file
from clip_assets.tuning.review_labels import (
    IMPORT,
    NO,
    NO_REVIEW_LABELS,
    YES,
    ReviewLabelsError,
    current_verdicts,
    insert_verdicts,
    labels_version,
    review_label_rows,
)


def batch_verdicts(store: Path, batch: str, categories: list[str]) -> dict[str, dict[int, bool]]:
    """A person's yes (True) or no (False) per image of `batch`, by image_id and category column (in
    `categories`' order): what classification applies over the scores. An image id is a hash of the
    path (clip_assets.ingest.manifest.image_id_for), so a verdict on a file that is gone names no
    classified image; it stays in the store and is applied to nothing, as is one on a category no
    prompt file defines."""
    column = {name: j for j, name in enumerate(categories)}
    verdicts: dict[str, dict[int, bool]] = {}
    for r in current_verdicts(store, batch=batch).values():
        if r.verdict in (YES, NO) and r.category in column:
            verdicts.setdefault(image_id_for(r.path), {})[column[r.category]] = r.verdict == YES
    return verdicts


def export_labels(store: Path, path: Path) -> Path:
    """Write the store's current yes/no verdicts as a labels file (CSV, or parquet by the suffix)
    that CLIP_ASSETS_LABELS and `read_labels_file` read: `path`, `labels` (the categories the image
    shows, or 'none') and `judged` (the categories it was judged on). Skips are left out."""
    rows = review_label_rows(store)
    if not rows.labels:
        raise ReviewLabelsError(f"{store} holds no yes/no verdict to export.")
    return write_labels_file(rows, path)


@dataclass(frozen=True)
class ImportSummary:
    rows: int  # images in the file
    added: int  # verdicts stored
    already_stored: int  # verdicts this same file gave in an earlier import


def import_labels(
    store: Path, path: Path, categories: Iterable[str] | None = None, layout: DataLayout | None = None
) -> ImportSummary:
    """Store the labels of a labels file (the format CLIP_ASSETS_LABELS reads) as verdicts of the
    `import` queue (never used for the precision estimate). Each image gets `yes` for the categories
    it shows and `no` for the others it is judged on: those of its `judged` column, else every one of
    `categories` (a file without a `judged` column judges whole images, so it needs them). A file keyed
    by `image_id` needs `layout`, whose manifests give the paths. Importing the same file again stores
    nothing new (each verdict's request id is a hash of the file and the verdict)."""
    labels = read_labels_file(path)
    all_categories = set(categories) if categories is not None else None
    if all_categories is None and set(labels.labels) - set(labels.judged):
        raise ReviewLabelsError(
            f"{path} labels whole images (no 'judged' column): pass the categories they were judged on."
        )
    paths = _paths_of(labels, layout, path)
    file_digest = content_digest(path)
    verdicts = []
    for key, shows in labels.labels.items():
        judged = labels.judged.get(key, all_categories) | shows
        for category in sorted(judged):
            verdict = YES if category in shows else NO
            request = hashlib.sha256(f"{file_digest}\t{paths[key]}\t{category}\t{verdict}".encode()).hexdigest()[:32]
            verdicts.append(
                {
                    "request_id": f"import-{request}",
                    "path": paths[key],
                    "category": category,
                    "verdict": verdict,
                    "queue": IMPORT,
                }
            )
    added = insert_verdicts(store, verdicts)
    return ImportSummary(rows=len(labels.labels), added=added, already_stored=len(verdicts) - added)


def _paths_of(labels: LabelRows, layout: DataLayout | None, source: Path) -> dict[str, str]:
    if labels.key == "path":
        return {k: k for k in labels.labels}
    if layout is None:
        raise ReviewLabelsError(f"{source} names images by image_id: the manifests are needed to find their paths.")
    found = manifest_column(layout, "image_id", "path", list(labels.labels))
    missing = sorted(set(labels.labels) - set(found))
    if missing:
        raise ReviewLabelsError(
            f"{len(missing)} image ids of {source} are in no manifest (e.g. {missing[0]}): nothing was imported."
        )
    return found


def manifest_column(layout: DataLayout, by: str, want: str, keys: list[str]) -> dict[str, str]:
    """`by` -> `want` ('path' or 'image_id') for the given keys, from every batch's manifest."""
    if not keys or not layout.manifest_dir.is_dir() or not any(layout.manifest_dir.glob("*.parquet")):
        return {}
    with scratch() as con:
        con.register("wanted", pa.table({"key": keys}))
        rows = con.execute(
            f"SELECT m.{by}, any_value(m.{want}) FROM read_parquet(?) m JOIN wanted w ON w.key = m.{by} GROUP BY m.{by}",
            [readable_manifests(layout)],  # a damaged manifest leaves its batch out, with a warning
        ).fetchall()
    return dict(rows)


def combined_labels(labels_path: Path | None, store: Path) -> LabelRows | None:
    """The labels file (CLIP_ASSETS_LABELS) and the store's verdicts as one set of labels; None when
    neither has any. Where both judge an image on a category, the store wins (it is the later, more
    deliberate word: a person looking at that image for that category). An image only the store
    judged is judged on its verdicts' categories alone. Keyed as the file is (by path without one; a
    path's image id is a hash of it, so a file that is gone matches nothing and is reported as a
    label without classifications, never applied to another image)."""
    stored = review_label_rows(store) if Path(store).is_file() else LabelRows("path", {})
    if labels_path is None:
        return stored if stored.labels else None
    from_file = read_labels_file(labels_path)
    if not stored.labels:
        return from_file
    key_of = {p: image_id_for(p) if from_file.key == "image_id" else p for p in stored.labels}
    labels = {k: set(v) for k, v in from_file.labels.items()}
    judged = {k: set(v) for k, v in from_file.judged.items()}
    for path, shows in stored.labels.items():
        key = key_of[path]
        verdicts = stored.judged[path]
        if key in labels:
            labels[key] = (labels[key] - verdicts) | shows
            if key in judged:
                judged[key] |= verdicts
        else:
            labels[key], judged[key] = set(shows), set(verdicts)
    return LabelRows(from_file.key, labels, judged)


def combined_version(labels_path: Path | None, store: Path) -> str:
    """What versions the combined labels: the labels file's content hash alone while the store has no
    verdict (as before there was a store), else a hash of both."""
    file_version = content_digest(labels_path, SOURCE_VERSION_CHARS) if labels_path is not None else "no-labels"
    store_version = labels_version(store)
    if store_version == NO_REVIEW_LABELS:
        return file_version
    return hashlib.sha256(f"{file_version}+{store_version}".encode()).hexdigest()[:SOURCE_VERSION_CHARS]
