"""The labels file a person writes (CLIP_ASSETS_LABELS, `--labels`): which categories each image shows.

A CSV or parquet file with a `path` or `image_id` column and a `labels` (or `categories`) column: the
categories the person sees, separated by ';', or "none". Such a row judges the whole image: every
category it does not name is one the image does not show. An optional `judged` column narrows that:
a row with one judges only the categories it lists (the others are unknown), which is how labels
given one category at a time in the review pages are exported (clip_assets.tuning.review_labels).
Calibration, evaluation and the adapters read it through `read_labels_file`; a file that cannot be
used is refused with what is wrong with it. `write_labels_file` writes the same format.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from clip_assets.storage.atomic_files import write_parquet_atomically, write_text_atomically

NONE_LABEL = "none"


class LabelsFileError(ValueError):
    """A labels file that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True)
class LabelRows:
    """Labels keyed by what the file named each image by: `path` or `image_id`.

    `labels`: the categories each image shows. `judged`: for images judged on some categories only,
    those categories (the ones in `labels` among them); an image absent from it is judged on every
    category, so a category its labels do not name is one it does not show."""

    key: str
    labels: dict[str, set[str]]
    judged: dict[str, set[str]] = field(default_factory=dict)

    def is_judged(self, key: str, category: str) -> bool:
        """Whether the labels say anything about `category` for the image `key`."""
        return key in self.labels and (key not in self.judged or category in self.judged[key])


def read_labels_file(path: Path) -> LabelRows:
    """CSV or parquet with a `path` or `image_id` column and a `labels` (or `categories`) column."""
    path = Path(path)
    if not path.is_file():
        raise LabelsFileError(f"No labels file at {path} (CLIP_ASSETS_LABELS / --labels).")
    rows = _read_parquet_rows(path) if _is_parquet(path) else _read_csv_rows(path)
    if not rows:
        raise LabelsFileError(f"{path} has no rows.")
    columns = set(rows[0])
    key = "image_id" if "image_id" in columns else "path" if "path" in columns else None
    label_col = "labels" if "labels" in columns else "categories" if "categories" in columns else None
    if key is None or label_col is None:
        raise LabelsFileError(
            f"{path} needs a 'path' or 'image_id' column and a 'labels' column (categories separated "
            f"by ';', or 'none'); it has {sorted(columns)}."
        )
    labels: dict[str, set[str]] = {}
    judged: dict[str, set[str]] = {}
    for row in rows:
        labels[str(row[key])] = _names(row[label_col])
        if "judged" in columns and row["judged"] is not None and str(row["judged"]).strip():
            judged[str(row[key])] = _names(row["judged"]) | labels[str(row[key])]
    return LabelRows(key=key, labels=labels, judged=judged)


def _names(cell) -> set[str]:
    return {c.strip() for c in str(cell or "").split(";")} - {"", NONE_LABEL}


def _joined(names: set[str]) -> str:
    return ";".join(sorted(names)) or NONE_LABEL


def write_labels_file(labels: LabelRows, path: Path) -> Path:
    """`labels` as a file `read_labels_file` reads back the same: parquet when `path` ends in .parquet,
    else CSV. The `judged` column is written only when some image is judged on some categories only
    (empty for an image judged on every category). Replaces the file whole (atomic write)."""
    path = Path(path)
    keys = sorted(labels.labels)
    columns = {labels.key: keys, "labels": [_joined(labels.labels[k]) for k in keys]}
    if labels.judged:
        columns["judged"] = [_joined(labels.judged[k]) if k in labels.judged else "" for k in keys]
    if path.suffix.lower() == ".parquet":
        write_parquet_atomically(pa.table(columns), path)
        return path
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(list(columns))
    writer.writerows(zip(*columns.values()))
    write_text_atomically(text.getvalue(), path)
    return path


def _is_parquet(path: Path) -> bool:
    """By name, or by content: parquet files begin with the magic bytes PAR1 whatever they are called."""
    with open(path, "rb") as f:
        return path.suffix.lower() == ".parquet" or f.read(4) == b"PAR1"


def _read_parquet_rows(path: Path) -> list[dict]:
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise LabelsFileError(f"{path} is not a readable parquet file ({' '.join(str(exc).split())}).") from exc


def _read_csv_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError as exc:
        raise LabelsFileError(
            f"{path} is not a UTF-8 text (CSV) file: byte {exc.start} is {exc.object[exc.start:exc.start + 1]!r}. "
            "Labels are a CSV file or a .parquet file."
        ) from exc
    except csv.Error as exc:  # e.g. NUL bytes: a binary file
        raise LabelsFileError(f"{path} is not a CSV file ({exc}). Labels are a CSV file or a .parquet file.") from exc
