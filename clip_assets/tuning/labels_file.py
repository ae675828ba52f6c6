"""The labels file a person writes (CLIP_ASSETS_LABELS, `--labels`): which categories each image shows.

A CSV or parquet file with a `path` or `image_id` column and a `labels` (or `categories`) column: the
categories the person sees, separated by ';', or "none". Calibration, evaluation and the adapters
read it through `read_labels_file`; a file that cannot be used is refused with what is wrong with it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

NONE_LABEL = "none"


class LabelsFileError(ValueError):
    """A labels file that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True)
class LabelRows:
    """Labels keyed by what the file named each image by: `path` or `image_id`."""

    key: str
    labels: dict[str, set[str]]


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
    for row in rows:
        names = {c.strip() for c in str(row[label_col] or "").split(";")} - {"", NONE_LABEL}
        labels[str(row[key])] = names
    return LabelRows(key=key, labels=labels)


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
