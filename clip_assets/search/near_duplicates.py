"""Near-duplicate images across the whole collection, found through the index shards.

Each batch's images are queried against every batch's shard (clip_assets.search.ann_index): each image's
`NEIGHBOURS` best candidates by approximate similarity, over all shards, are re-scored exactly, and
pairs at or above the threshold are kept in a pair file per batch
(`near_duplicates/pairs/<batch>.parquet`), stamped with the shard version it was computed from.
Pairs become groups around a first image: images are taken by batch, then path, and each one not
yet in a group starts one with its partners not yet in one, so every image of a group is at or above
the threshold against the group's first image (connected components would chain look-alikes of
look-alikes far below it).

Incremental: a batch is queried again only when its shard changed (or the threshold did). A pair of
two batches is taken from whichever of their two pair files was computed later: that one saw both
batches as they are now, so a changed batch's pairs with unchanged neighbours replace the old ones
without querying the neighbours again. Groups are then re-formed from all pair files (cheap: pairs
are few next to images).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import default
from clip_assets.ingest.manifest import image_paths
from clip_assets.search import ann_index
from clip_assets.search.search_rows import ensure_search_rows, mapped_rows
from clip_assets.search.shard_set import ShardSet
from clip_assets.storage.atomic_files import write_parquet_atomically
from clip_assets.storage.damaged_files import DUPLICATE_PAIRS, DamagedFileError
from clip_assets.storage.warehouse import replace_duplicate_groups

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = default("duplicate_threshold")  # CLIP_ASSETS_DUPLICATE_THRESHOLD
NEIGHBOURS = 16  # per image and shard; a larger group still joins up through its members' pairs
NPROBE = 32  # pairs at cosine >= 0.95 sit in the same or neighbouring lists: fewer than a search probes
CANDIDATE_ENTRIES_PER_CHUNK = 4_000_000  # bounds memory: queries per chunk x shards x NEIGHBOURS

PAIRS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("other_batch", pa.string(), nullable=False),
        pa.field("other_image_id", pa.string(), nullable=False),
        pa.field("similarity", pa.float32(), nullable=False),
    ]
)


def find_pairs(shards: ShardSet, shard_no: int, threshold: float, ids: dict[str, pa.ChunkedArray],
               neighbours: int = NEIGHBOURS, nprobe: int = NPROBE) -> pa.Table:
    """Pairs (an image of shard `shard_no`, any other stored image) with cosine similarity >= threshold."""
    shard = shards.shards[shard_no]
    rows = len(shard.vectors)
    chunk = max(64, CANDIDATE_ENTRIES_PER_CHUNK // max(1, len(shards.shards) * neighbours))
    parts = []
    for start in range(0, rows, chunk):
        queries = np.ascontiguousarray(shard.vectors[start : start + chunk], dtype=np.float32)
        _, other_shard, other_row = shards.candidates(queries, neighbours, nprobe)  # best first
        other_shard, other_row = other_shard[:, :neighbours], other_row[:, :neighbours]
        query_row = np.broadcast_to(np.arange(start, start + len(queries))[:, None], other_row.shape)
        keep = other_row >= 0
        keep &= ~((other_shard == shard_no) & (other_row == query_row))  # not itself
        q, o_shard, o_row = query_row[keep], other_shard[keep], other_row[keep]
        if not len(q):
            continue
        exact = np.einsum("ij,ij->i", shards.vectors_of(o_shard, o_row), queries[q - start])
        good = exact >= threshold
        parts.append((q[good], o_shard[good], o_row[good], exact[good]))
    if not parts:
        return PAIRS_SCHEMA.empty_table()
    q, o_shard, o_row, sim = (np.concatenate(p) for p in zip(*parts))
    names = np.array([s.name for s in shards.shards], dtype=object)
    other_ids = [ids[names[s]][int(r)].as_py() for s, r in zip(o_shard, o_row)]
    return pa.table(
        {
            "image_id": ids[shard.name].take(pa.array(q)).combine_chunks(),
            "other_batch": pa.array(names[o_shard].tolist(), pa.string()),
            "other_image_id": pa.array(other_ids, pa.string()),
            "similarity": pa.array(sim.astype(np.float32)),
        },
        schema=PAIRS_SCHEMA,
    )


def _pair_file_stamp(layout: DataLayout, batch: str) -> dict | None:
    """What the batch's pair file was computed from; None when there is none (DamagedFileError when it
    cannot be read)."""
    path = layout.duplicate_pairs_path(batch)
    if not path.is_file():
        return None
    with DUPLICATE_PAIRS.reading(path, batch):
        meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items()}


@dataclass
class DuplicatesSummary:
    threshold: float
    indexed_batches: list[str]
    recomputed: list[str]  # queried against the whole index in this run
    reused: list[str]  # pair files kept from an earlier run
    waiting_for_index: list[str]  # no fresh shard: left out until image_search_index is materialized
    damaged: list[str] = field(default_factory=list)  # damaged files met (left out or rebuilt), one sentence each
    pairs: int = 0
    groups: int = 0
    images_in_groups: int = 0
    seconds: float = 0.0
    largest: list[dict] = field(default_factory=list)


def update_pairs(layout: DataLayout, batches: list[str], threshold: float) -> DuplicatesSummary:
    """Query the batches whose shard changed against every shard; keep the other batches' pair files."""
    started = time.perf_counter()
    versions = {b: ann_index.shard_version(layout, b) for b in batches}
    indexed = [b for b in batches if versions[b]]
    waiting = [b for b in batches if not versions[b]]
    pairs_dir = layout.duplicate_pairs_path("x").parent
    for stale in pairs_dir.glob("*.parquet") if pairs_dir.is_dir() else []:
        if stale.stem not in indexed:  # a removed batch, or one whose embeddings changed since its shard
            stale.unlink()
    changed, damaged = [], []
    for b in indexed:
        try:
            stamp = _pair_file_stamp(layout, b)
        except DamagedFileError as exc:  # its pairs are computed again
            damaged.append(DUPLICATE_PAIRS.set_aside(exc.path, exc.reason, b))
            stamp = None
        if stamp is None or stamp.get("shard_version") != versions[b] or float(stamp.get("threshold", "nan")) != threshold:
            changed.append(b)
    if changed:
        unreadable: list[DamagedFileError] = []
        shards, left_out = ann_index.open_batch_shards(layout, indexed, unreadable)
        damaged += [str(exc) for exc in unreadable]
        if left_out:  # a damaged shard: its batch waits for image_search_index, as one without a shard does
            indexed = [b for b in indexed if b not in left_out]
            changed = [b for b in changed if b not in left_out]
            waiting += left_out
        shard_set = ShardSet(shards)
        ids = {s.name: pq.read_table(layout.embeddings_path(s.name), columns=["image_id"])["image_id"] for s in shards}
        number = {s.name: i for i, s in enumerate(shards)}
        for b in changed:
            table = find_pairs(shard_set, number[b], threshold, ids)
            meta = {"batch": b, "shard_version": versions[b], "threshold": repr(threshold),
                    "computed_ns": str(time.time_ns())}
            write_parquet_atomically(table.replace_schema_metadata(meta), layout.duplicate_pairs_path(b))
    return DuplicatesSummary(threshold, indexed, changed, [b for b in indexed if b not in changed], waiting,
                             damaged, seconds=time.perf_counter() - started)


def current_pairs(layout: DataLayout, batches: list[str]) -> pa.Table:
    """Every pair of the batches, each pair of batches taken from the later-computed of their two pair files."""
    computed = {b: int(_pair_file_stamp(layout, b)["computed_ns"]) for b in batches}
    tables = []
    for b in batches:
        with DUPLICATE_PAIRS.reading(layout.duplicate_pairs_path(b), b):
            table = pq.read_table(layout.duplicate_pairs_path(b))
        other = table["other_batch"].to_pylist()
        keep = [o == b or (o in computed and (computed[b], b) > (computed[o], o)) for o in other]
        table = table.filter(pa.array(keep, pa.bool_()))
        tables.append(table.append_column("batch", pa.array([b] * table.num_rows, pa.string())))
    if not tables:
        return PAIRS_SCHEMA.append(pa.field("batch", pa.string())).empty_table()
    return pa.concat_tables(tables)


def groups_of(pairs: pa.Table, order: Callable[[tuple[str, str]], Any] = lambda image: image) -> list[list[tuple[str, str]]]:
    """Groups of (batch, image_id), 2 or more each, first image first, in which every image is a pair
    of the group's first image: images are taken in `order`, and each one not yet in a group starts a
    group with its partners not yet in one. A look-alike of a look-alike is not joined through the
    middle image (connected components would chain them, far below the threshold)."""
    partners: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for batch, image_id, other_batch, other_id in zip(
        pairs["batch"].to_pylist(), pairs["image_id"].to_pylist(),
        pairs["other_batch"].to_pylist(), pairs["other_image_id"].to_pylist(),
    ):
        a, b = (batch, image_id), (other_batch, other_id)
        if a != b:
            partners.setdefault(a, set()).add(b)
            partners.setdefault(b, set()).add(a)
    grouped: set[tuple[str, str]] = set()
    groups = []
    for first in sorted(partners, key=order):
        if first in grouped:
            continue
        members = sorted((m for m in partners[first] if m not in grouped), key=order)
        if members:
            grouped.update([first, *members])
            groups.append([first, *members])
    return groups


GROUP_ROWS_SCHEMA = pa.schema(
    [
        pa.field("group_id", pa.string(), nullable=False),  # the image_id of the group's first image
        pa.field("position", pa.int32(), nullable=False),  # 0: the first image (by batch, then path)
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("batch", pa.string(), nullable=False),
        pa.field("similarity", pa.float32(), nullable=False),  # cosine similarity to the first image
        pa.field("threshold", pa.float64(), nullable=False),
    ]
)


def paired_image_paths(layout: DataLayout, pairs: pa.Table) -> dict[str, str]:
    """{image_id: path} of every image in the pairs, from the manifests."""
    by_batch: dict[str, set[str]] = {}
    for batch_column, id_column in (("batch", "image_id"), ("other_batch", "other_image_id")):
        for batch, image_id in zip(pairs[batch_column].to_pylist(), pairs[id_column].to_pylist()):
            by_batch.setdefault(batch, set()).add(image_id)
    return image_paths(layout, by_batch)


def group_rows(layout: DataLayout, groups: list[list[tuple[str, str]]], paths: dict[str, str],
               threshold: float) -> pa.Table:
    """One row per image in a group (first image first): its path, its similarity to the first image, exactly."""
    by_batch: dict[str, list[str]] = {}
    for g in groups:
        for batch, image_id in g:
            by_batch.setdefault(batch, []).append(image_id)
    vectors: dict[tuple[str, str], np.ndarray] = {}
    for batch, wanted in by_batch.items():
        ids = pq.read_table(layout.embeddings_path(batch), columns=["image_id"])["image_id"].to_pylist()
        row_of = {image_id: row for row, image_id in enumerate(ids)}
        mapped = mapped_rows(ensure_search_rows(layout.embeddings_path(batch)))
        for image_id in wanted:
            vectors[(batch, image_id)] = np.asarray(mapped[row_of[image_id]])
    columns = {name: [] for name in GROUP_ROWS_SCHEMA.names}
    for g in groups:
        first = vectors[g[0]]
        for position, (batch, image_id) in enumerate(g):
            columns["group_id"].append(g[0][1])
            columns["position"].append(position)
            columns["image_id"].append(image_id)
            columns["path"].append(paths.get(image_id, ""))
            columns["batch"].append(batch)
            columns["similarity"].append(float(vectors[(batch, image_id)] @ first))
            columns["threshold"].append(threshold)
    return pa.table(columns, schema=GROUP_ROWS_SCHEMA)


def update_duplicate_groups(layout: DataLayout, batches: list[str], threshold: float = DEFAULT_THRESHOLD) -> DuplicatesSummary:
    """Bring the pair files up to date for `batches` (the whole collection), re-form the groups and
    replace DuckDB's duplicate_groups with them."""
    if not 0 < threshold <= 1:
        raise ValueError(f"the near-duplicate threshold is a cosine similarity in (0, 1], got {threshold}")
    summary = update_pairs(layout, batches, threshold)
    started = time.perf_counter()
    pairs = current_pairs(layout, summary.indexed_batches)
    paths = paired_image_paths(layout, pairs)
    groups = groups_of(pairs, order=lambda image: (image[0], paths.get(image[1], ""), image[1]))  # by batch, then path
    rows = group_rows(layout, groups, paths, threshold)
    replace_duplicate_groups(layout.duckdb_path, rows)
    summary.pairs, summary.groups, summary.images_in_groups = pairs.num_rows, len(groups), rows.num_rows
    summary.seconds += time.perf_counter() - started
    sizes = Counter(rows["group_id"].to_pylist())
    first_paths = {r["group_id"]: r["path"] for r in rows.to_pylist() if r["position"] == 0}
    summary.largest = [{"first_path": first_paths[gid], "images": n}
                       for gid, n in sorted(sizes.items(), key=lambda x: (-x[1], first_paths[x[0]]))[:10]]
    return summary
