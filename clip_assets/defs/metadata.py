"""Typed Dagster metadata built from the step functions' summaries: tables with a schema, pictures.

The UI renders a `TableMetadataValue` as a sortable table with typed columns; pictures are
markdown data URIs, the one way Dagster shows an image inline.
"""

from __future__ import annotations

import dagster as dg

from clip_assets.pages.plots import image_markdown

# Column types Dagster's table schema knows, by the Python type of a value.
_TYPES = {bool: "bool", int: "int", float: "float", str: "string"}


def table(rows: list[dict], columns: dict[str, str] | None = None) -> dg.TableMetadataValue:
    """`rows` as a typed table; `columns` (name -> Dagster type) when rows may be empty or mixed."""
    if columns is None:
        columns = {name: _TYPES.get(type(value), "string") for name, value in (rows[0] if rows else {}).items()}
    schema = dg.TableSchema(columns=[dg.TableColumn(name, kind) for name, kind in columns.items()])
    return dg.MetadataValue.table([dg.TableRecord({k: r[k] for k in columns}) for r in rows], schema=schema)


def reasons_table(reasons: dict[str, str]) -> dg.TableMetadataValue:
    """Files that could not be used, and why (the first few of a batch)."""
    return table([{"path": p, "reason": r[:300]} for p, r in reasons.items()], {"path": "string", "reason": "string"})


def picture(data: bytes, alt: str) -> dg.MarkdownMetadataValue:
    """A PNG or JPEG shown inline on the asset page."""
    return dg.MetadataValue.md(image_markdown(data, alt))
