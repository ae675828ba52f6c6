"""Near-duplicate images across the whole collection, in three tiers: exact copies, copies, look-alikes.

- Exact copies: the same bytes. The embedding step stores a fingerprint (sha1) of every file it
  reads, so these are found from the embeddings files' fingerprint column alone: no model, no index.
- Copies: the same picture re-encoded, resized, slightly cropped or recoloured. The embedding finds
  the candidates through the index (clip_assets.search.ann_index): each image's `NEIGHBOURS` best
  candidates by approximate similarity, over all shards, are re-scored exactly, so the cost grows with
  the collection, not with its square. A pair is a copy when its similarity reaches the copy threshold
  (learnt for the model from the collection's own images: clip_assets.search.copy_threshold; or set
  by hand) and the two images' perceptual hashes (clip_assets.embedding.perceptual_hash), a second
  signal independent of the model, differ in at most `hash_distance` bits, and their colour layouts
  (8x8 cells of mean colour, read from the two files for the pairs that got this far: pHash sees only
  light and dark) correlate within COLOUR_DISTANCE_BOUND. An image whose hash is unknown (its batch was
  embedded before hashes were stored) or whose file cannot be read has no copy confirmed: the summary
  says how many, and re-embedding their batches adds the hashes.
- Look-alikes: similar pictures, at or above the look-alike threshold (CLIP_ASSETS_DUPLICATE_THRESHOLD)
  but not copies. They are kept apart from copies, and the app shows them only when asked.

Candidate pairs that may be one of the two are kept in a pair file per batch
(`near_duplicates/pairs/<batch>.parquet`) with their similarity and the hashes' distance, stamped with
the shard version and the thresholds they were computed for. Groups are formed per tier around a
first image: images are taken by batch, then path, and each one not yet in a group starts one with its
partners not yet in one, so every image of a group passes its tier's rule against the group's first
image (connected components would chain look-alikes of look-alikes far below it). Exact copies are one
image to the copy tier (a copy of one of them is a copy of all), and an image in an exact or copy
group is not grouped again among look-alikes. Each group marks the file a person would keep by
default: the largest resolution, then the oldest.

Incremental: a batch is queried again only when its shard changed (or a threshold did). A pair of
two batches is taken from whichever of their two pair files was computed later: that one saw both
batches as they are now, so a changed batch's pairs with unchanged neighbours replace the old ones
without querying the neighbours again. Groups are then re-formed from all pair files (cheap: pairs
are few next to images).
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import default
from clip_assets.embedding.perceptual_hash import (
    COLOUR_DISTANCE_BOUND,
    colour_distance,
    colour_layouts_of_files,
    hamming,
)
from clip_assets.ingest.manifest import image_rows
from clip_assets.search import ann_index
from clip_assets.search.copy_threshold import CopyThreshold, collection_model
from clip_assets.search.search_rows import ensure_search_rows, mapped_rows
from clip_assets.search.shard_set import ShardSet
from clip_assets.storage.atomic_files import write_parquet_atomically
from clip_assets.storage.damaged_files import DUPLICATE_PAIRS, EMBEDDINGS, DamagedFileError
from clip_assets.storage.store_root import StoreRoot, file_source
from clip_assets.storage.warehouse import replace_duplicate_groups

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = default("duplicate_threshold")  # CLIP_ASSETS_DUPLICATE_THRESHOLD: look-alikes
DEFAULT_HASH_DISTANCE = default("copy_hash_distance")  # CLIP_ASSETS_COPY_HASH_DISTANCE
NEIGHBOURS = 16  # per image and shard; a larger group still joins up through its members' pairs
NPROBE = 32  # pairs at cosine >= 0.95 sit in the same or neighbouring lists: fewer than a search probes
CANDIDATE_ENTRIES_PER_CHUNK = 4_000_000  # bounds memory: queries per chunk x shards x NEIGHBOURS
PAIRS_FORMAT = "2"  # pair files of another format (before hashes) are computed again

EXACT, COPY, LOOK_ALIKE = "exact", "copy", "look-alike"
TIERS = (EXACT, COPY, LOOK_ALIKE)  # strongest first (duplicate_choices.TIERS)
NO_HASH = -1  # hash_distance where either hash is unknown

PAIRS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("other_batch", pa.string(), nullable=False),
        pa.field("other_image_id", pa.string(), nullable=False),
        pa.field("similarity", pa.float32(), nullable=False),
        pa.field("hash_distance", pa.int16(), nullable=False),  # bits; NO_HASH where a hash is unknown
    ]
)


@dataclass(frozen=True)
class Rules:
    """What makes a pair a copy or a look-alike."""

    look_alike: float  # cosine similarity
    copy: float  # cosine similarity, with the hashes within hash_distance
    hash_distance: int

    def tier(self, similarity: np.ndarray, hash_distance: np.ndarray) -> np.ndarray:
        """COPY, LOOK_ALIKE or '' per pair."""
        copies = (similarity >= self.copy) & (hash_distance >= 0) & (hash_distance <= self.hash_distance)
        return np.where(copies, COPY, np.where(similarity >= self.look_alike, LOOK_ALIKE, ""))

    def stamp(self) -> dict[str, str]:
        return {"look_alike": repr(self.look_alike), "copy": repr(self.copy), "hash_distance": str(self.hash_distance),
                "format": PAIRS_FORMAT}


def batch_hashes(layout: DataLayout, batch: str) -> np.ndarray:
    """The batch's perceptual hashes in its embeddings file's row order, int64; rows whose hash is
    unknown (or a file from before hashes) hold a value no hash is compared with (see `known`)."""
    path = layout.embeddings_path(batch)
    if "perceptual_hash" not in pq.read_schema(path).names:
        return np.zeros(pq.read_metadata(path).num_rows, dtype=np.int64), np.zeros(pq.read_metadata(path).num_rows, bool)
    column = pq.read_table(path, columns=["perceptual_hash"])["perceptual_hash"]
    return (pc.fill_null(column, 0).to_numpy().astype(np.int64),
            pc.is_valid(column).to_numpy(zero_copy_only=False))


def find_pairs(shards: ShardSet, shard_no: int, rules: Rules, ids: dict[str, pa.ChunkedArray],
               hashes: dict[str, tuple[np.ndarray, np.ndarray]], neighbours: int = NEIGHBOURS,
               nprobe: int = NPROBE) -> pa.Table:
    """Pairs (an image of shard `shard_no`, any other stored image) that are copies or look-alikes by `rules`."""
    shard = shards.shards[shard_no]
    rows = len(shard.vectors)
    chunk = max(64, CANDIDATE_ENTRIES_PER_CHUNK // max(1, len(shards.shards) * neighbours))
    names = np.array([s.name for s in shards.shards], dtype=object)
    all_hashes = [hashes[n][0] for n in names]
    all_known = [hashes[n][1] for n in names]
    own_hash, own_known = hashes[shard.name]
    lowest = min(rules.look_alike, rules.copy)
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
        near = exact >= lowest
        q, o_shard, o_row, exact = q[near], o_shard[near], o_row[near], exact[near]
        other_hash = np.zeros(len(q), dtype=np.int64)
        other_known = np.zeros(len(q), dtype=bool)
        for s in np.unique(o_shard):
            mine = o_shard == s
            other_hash[mine], other_known[mine] = all_hashes[s][o_row[mine]], all_known[s][o_row[mine]]
        bits = np.where(other_known & own_known[q], hamming(own_hash[q], other_hash), NO_HASH).astype(np.int16)
        good = rules.tier(exact, bits) != ""
        parts.append((q[good], o_shard[good], o_row[good], exact[good], bits[good]))
    if not parts:
        return PAIRS_SCHEMA.empty_table()
    q, o_shard, o_row, sim, bits = (np.concatenate(p) for p in zip(*parts))
    other_ids = [ids[names[s]][int(r)].as_py() for s, r in zip(o_shard, o_row)]
    return pa.table(
        {
            "image_id": ids[shard.name].take(pa.array(q)).combine_chunks(),
            "other_batch": pa.array(names[o_shard].tolist(), pa.string()),
            "other_image_id": pa.array(other_ids, pa.string()),
            "similarity": pa.array(sim.astype(np.float32)),
            "hash_distance": pa.array(bits.astype(np.int16)),
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
    threshold: float  # look-alikes
    indexed_batches: list[str]
    recomputed: list[str]  # queried against the whole index in this run
    reused: list[str]  # pair files kept from an earlier run
    waiting_for_index: list[str]  # no fresh shard: left out until image_search_index is materialized
    damaged: list[str] = field(default_factory=list)  # damaged files met (left out or rebuilt), one sentence each
    copy_threshold: float | None = None
    copy_threshold_source: str = ""  # "learnt for <model>", "set by hand", or why neither
    hash_distance: int = DEFAULT_HASH_DISTANCE
    learnt: CopyThreshold | None = None
    without_hash: int = 0  # images whose perceptual hash is unknown: no copy of theirs is confirmed
    without_hash_batches: list[str] = field(default_factory=list)
    refused_by_colour: int = 0  # pairs with the similarity and the hash of copies whose colour layouts differ
    colour_unreadable: list[str] = field(default_factory=list)  # files whose colour layout could not be read
    pairs: int = 0
    groups: int = 0
    images_in_groups: int = 0
    groups_by_tier: dict[str, int] = field(default_factory=dict)
    images_by_tier: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    largest: list[dict] = field(default_factory=list)


def update_pairs(layout: DataLayout, batches: list[str], rules: Rules | float) -> DuplicatesSummary:
    """Query the batches whose shard changed against every shard; keep the other batches' pair files.
    `rules` a number: one threshold for copies and look-alikes alike."""
    if not isinstance(rules, Rules):
        rules = Rules(rules, rules, DEFAULT_HASH_DISTANCE)
    started = time.perf_counter()
    versions = {b: ann_index.shard_version(layout, b) for b in batches}
    indexed = [b for b in batches if versions[b]]
    waiting = [b for b in batches if not versions[b]]
    pairs_dir = layout.duplicate_pairs_dir
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
        if stamp is None or stamp.get("shard_version") != versions[b] or \
                {k: stamp.get(k) for k in rules.stamp()} != rules.stamp():
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
        hashes = {s.name: batch_hashes(layout, s.name) for s in shards}
        number = {s.name: i for i, s in enumerate(shards)}
        for b in changed:
            table = find_pairs(shard_set, number[b], rules, ids, hashes)
            meta = {"batch": b, "shard_version": versions[b], **rules.stamp(), "computed_ns": str(time.time_ns())}
            write_parquet_atomically(table.replace_schema_metadata(meta), layout.duplicate_pairs_path(b))
    return DuplicatesSummary(rules.look_alike, indexed, changed, [b for b in indexed if b not in changed], waiting,
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


def exact_copies(layout: DataLayout, batches: list[str], damaged: list[str] | None = None) -> list[list[tuple[str, str]]]:
    """Sets of (batch, image_id) whose files have the same bytes (the fingerprint the embedding step
    stored): read from the embeddings files alone, whether or not their batch has an index shard."""
    tables = []
    for batch in batches:
        path = layout.embeddings_path(batch)
        if not path.is_file():
            continue
        try:
            with EMBEDDINGS.reading(path, batch):
                t = pq.read_table(path, columns=["image_id", "fingerprint"])
        except DamagedFileError as exc:
            log.warning("%s", exc)
            if damaged is not None:
                damaged.append(str(exc))
            continue
        t = t.filter(pc.is_valid(t["fingerprint"]))
        tables.append(t.append_column("batch", pa.array([batch] * t.num_rows, pa.string())))
    if not tables:
        return []
    rows = pa.concat_tables(tables)
    counts = rows.group_by("fingerprint").aggregate([("image_id", "count")])
    repeated = counts.filter(pc.greater(counts["image_id_count"], 1))["fingerprint"]
    rows = rows.filter(pc.is_in(rows["fingerprint"], repeated))
    sets: dict[str, list[tuple[str, str]]] = {}
    for fp, batch, image_id in zip(rows["fingerprint"].to_pylist(), rows["batch"].to_pylist(),
                                   rows["image_id"].to_pylist()):
        sets.setdefault(fp, []).append((batch, image_id))
    return list(sets.values())


def groups_of(pairs: pa.Table, order: Callable[[tuple[str, str]], Any] = lambda image: image,
              node: Callable[[tuple[str, str]], tuple[str, str]] = lambda image: image,
              excluded: set[tuple[str, str]] = frozenset()) -> list[list[tuple[str, str]]]:
    """Groups of (batch, image_id), 2 or more each, first image first, in which every image is a pair
    of the group's first image: images are taken in `order`, and each one not yet in a group starts a
    group with its partners not yet in one. A look-alike of a look-alike is not joined through the
    middle image (connected components would chain them, far below the threshold). `node` maps an
    image to the one that stands for it (an exact copy's first image); `excluded` images join no group."""
    partners: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for batch, image_id, other_batch, other_id in zip(
        pairs["batch"].to_pylist(), pairs["image_id"].to_pylist(),
        pairs["other_batch"].to_pylist(), pairs["other_image_id"].to_pylist(),
    ):
        a, b = node((batch, image_id)), node((other_batch, other_id))
        if a != b and a not in excluded and b not in excluded:
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


@dataclass
class TieredGroups:
    """Groups of (batch, image_id), first image first, each with its tier."""

    groups: list[list[tuple[str, str]]]
    tiers: list[str]


def tiered_groups(pairs: pa.Table, exact: list[list[tuple[str, str]]], rules: Rules,
                  order: Callable[[tuple[str, str]], Any], colour_agrees: np.ndarray | None = None) -> TieredGroups:
    """Exact copies, then copies (an exact set is one image to them), then look-alikes of the rest.
    `colour_agrees`: per pair, whether the colour layouts confirm a copy (None: not checked)."""
    stands_for: dict[tuple[str, str], tuple[str, str]] = {}
    exact_sets: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for members in exact:
        members = sorted(members, key=order)
        exact_sets[members[0]] = members
        stands_for.update({m: members[0] for m in members})

    def node(image):
        return stands_for.get(image, image)

    tier = rules.tier(pairs["similarity"].to_numpy(), pairs["hash_distance"].to_numpy()) if pairs.num_rows else \
        np.array([], dtype=str)
    if colour_agrees is not None:
        refused = (tier == COPY) & ~colour_agrees
        tier = np.where(refused, np.where(pairs["similarity"].to_numpy() >= rules.look_alike, LOOK_ALIKE, ""), tier)
    copy_pairs = pairs.filter(pa.array(tier == COPY, pa.bool_()))
    look_pairs = pairs.filter(pa.array(tier != "", pa.bool_()))  # a copy is a look-alike too
    groups, tiers = [], []
    in_group: set[tuple[str, str]] = set()
    for g in groups_of(copy_pairs, order, node):
        expanded = [m for first in g for m in exact_sets.get(first, [first])]
        groups.append(expanded)
        tiers.append(COPY)
        in_group.update(expanded)
    for first, members in exact_sets.items():
        if first not in in_group:
            groups.append(members)
            tiers.append(EXACT)
            in_group.update(members)
    for g in groups_of(look_pairs, order, excluded=in_group):
        groups.append(g)
        tiers.append(LOOK_ALIKE)
    return TieredGroups(groups, tiers)


GROUP_ROWS_SCHEMA = pa.schema(
    [
        pa.field("group_id", pa.string(), nullable=False),  # the image_id of the group's first image
        pa.field("position", pa.int32(), nullable=False),  # 0: the first image (by batch, then path)
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("batch", pa.string(), nullable=False),
        pa.field("similarity", pa.float32(), nullable=False),  # cosine similarity to the first image
        pa.field("threshold", pa.float64(), nullable=False),  # the tier's similarity threshold (exact: 1)
        pa.field("tier", pa.string(), nullable=False),  # exact, copy or look-alike
        pa.field("same_bytes", pa.bool_(), nullable=False),  # the first image's bytes exactly
        pa.field("hash_distance", pa.int16()),  # perceptual hash bits that differ from the first image's; null: unknown
        pa.field("width", pa.int32()),  # pixels, from the file's header; null where it cannot be read
        pa.field("height", pa.int32()),
        pa.field("file_size", pa.int64()),  # bytes, from the manifest
        pa.field("mtime", pa.float64()),
        pa.field("suggested_keep", pa.bool_(), nullable=False),  # the file kept by default: largest, then oldest
    ]
)


def image_size(image_root: Path | StoreRoot, path: str) -> tuple[int | None, int | None]:
    """(width, height) as the file's header says, or (None, None) where it cannot be read."""
    try:
        source = file_source(image_root, path)
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source())) as img:
            return img.size
    except Exception:
        return None, None


def suggested_keep(members: list[dict]) -> int:
    """The position of the file a person keeps by default: the largest resolution, then the oldest,
    then the first."""
    def key(k: int):
        m = members[k]
        pixels = (m["width"] or 0) * (m["height"] or 0)
        return (-pixels, m["mtime"] if m["mtime"] is not None else float("inf"), k)

    return min(range(len(members)), key=key)


def group_rows(layout: DataLayout, tiered: TieredGroups, manifest: dict[str, dict], rules: Rules,
               fingerprints: dict[tuple[str, str], str | None], hashes: dict[tuple[str, str], int | None],
               image_root: Path | StoreRoot | None = None) -> pa.Table:
    """One row per image in a group (first image first): its path, its similarity to the first image
    (exactly), its hash distance to it, its size and the file kept by default."""
    by_batch: dict[str, list[str]] = {}
    for g in tiered.groups:
        for batch, image_id in g:
            by_batch.setdefault(batch, []).append(image_id)
    vectors: dict[tuple[str, str], np.ndarray] = {}
    for batch, wanted in by_batch.items():
        ids = pq.read_table(layout.embeddings_path(batch), columns=["image_id"])["image_id"].to_pylist()
        row_of = {image_id: row for row, image_id in enumerate(ids)}
        mapped = mapped_rows(ensure_search_rows(layout.embeddings_path(batch)))
        for image_id in wanted:
            vectors[(batch, image_id)] = np.asarray(mapped[row_of[image_id]])
    threshold_of = {EXACT: 1.0, COPY: rules.copy, LOOK_ALIKE: rules.look_alike}
    columns = {name: [] for name in GROUP_ROWS_SCHEMA.names}
    for g, tier in zip(tiered.groups, tiered.tiers):
        first = vectors[g[0]]
        members = []
        for batch, image_id in g:
            row = manifest.get(image_id, {})
            path = row.get("path", "")
            width, height = image_size(image_root, path) if image_root is not None and path else (None, None)
            members.append({"width": width, "height": height, "mtime": row.get("mtime"), "size": row.get("size")})
        keep = suggested_keep(members)
        for position, ((batch, image_id), m) in enumerate(zip(g, members)):
            same = fingerprints.get((batch, image_id)) is not None and \
                fingerprints.get((batch, image_id)) == fingerprints.get(g[0])
            h, h0 = hashes.get((batch, image_id)), hashes.get(g[0])
            columns["group_id"].append(g[0][1])
            columns["position"].append(position)
            columns["image_id"].append(image_id)
            columns["path"].append(manifest.get(image_id, {}).get("path", ""))
            columns["batch"].append(batch)
            columns["similarity"].append(float(vectors[(batch, image_id)] @ first))
            columns["threshold"].append(threshold_of[tier])
            columns["tier"].append(tier)
            columns["same_bytes"].append(bool(same))
            columns["hash_distance"].append(
                None if h is None or h0 is None else int(hamming(np.array([h]), np.array([h0]))[0]))
            columns["width"].append(m["width"])
            columns["height"].append(m["height"])
            columns["file_size"].append(m["size"])
            columns["mtime"].append(m["mtime"])
            columns["suggested_keep"].append(position == keep)
    return pa.table(columns, schema=GROUP_ROWS_SCHEMA)


def colour_confirmation(pairs: pa.Table, rules: Rules, image_root: Path | StoreRoot,
                        manifest: dict[str, dict]) -> tuple[np.ndarray, int, list[str]]:
    """Per pair, whether the colour layouts of its two files confirm a copy (read only for pairs that
    pass the copy rule's similarity and hash); the number refused; the files that could not be read."""
    agrees = np.ones(pairs.num_rows, dtype=bool)
    if not pairs.num_rows:
        return agrees, 0, []
    candidates = np.flatnonzero(rules.tier(pairs["similarity"].to_numpy(), pairs["hash_distance"].to_numpy()) == COPY)
    left = list(zip(pairs["batch"].to_pylist(), pairs["image_id"].to_pylist()))
    right = list(zip(pairs["other_batch"].to_pylist(), pairs["other_image_id"].to_pylist()))
    wanted = {image for k in candidates for image in (left[k], right[k])}
    paths = {image: manifest.get(image[1], {}).get("path") for image in wanted}
    layouts = colour_layouts_of_files(image_root, {image: p for image, p in paths.items() if p})
    layouts.update({image: None for image, p in paths.items() if not p})
    for k in candidates:
        a, b = layouts[left[k]], layouts[right[k]]
        agrees[k] = a is not None and b is not None and colour_distance(a, b) <= COLOUR_DISTANCE_BOUND
    unreadable = sorted(manifest.get(image[1], {}).get("path", image[1]) for image, v in layouts.items() if v is None)
    return agrees, int((~agrees).sum()), unreadable


def _content_of(layout: DataLayout, images: dict[str, set[str]]) -> tuple[dict, dict]:
    """{(batch, image_id): fingerprint} and {(batch, image_id): perceptual hash or None} of the images."""
    fingerprints, hashes = {}, {}
    for batch, wanted in images.items():
        path = layout.embeddings_path(batch)
        names = pq.read_schema(path).names
        columns = ["image_id", "fingerprint"] + (["perceptual_hash"] if "perceptual_hash" in names else [])
        t = pq.read_table(path, columns=columns, filters=[("image_id", "in", sorted(wanted))])
        hs = t["perceptual_hash"].to_pylist() if "perceptual_hash" in names else [None] * t.num_rows
        for image_id, fp, h in zip(t["image_id"].to_pylist(), t["fingerprint"].to_pylist(), hs):
            fingerprints[(batch, image_id)], hashes[(batch, image_id)] = fp, h
    return fingerprints, hashes


def images_without_hash(layout: DataLayout, batches: list[str]) -> tuple[int, list[str]]:
    """Images whose perceptual hash is unknown, and the batches that hold them."""
    total, where = 0, []
    for batch in batches:
        path = layout.embeddings_path(batch)
        if not path.is_file():
            continue
        meta = pq.read_metadata(path)
        leaves = [meta.schema.column(i).path for i in range(meta.num_columns)]
        if "perceptual_hash" not in leaves:
            missing = meta.num_rows
        else:  # the footer's null counts where the writer kept them (pyarrow does), else the column itself
            column = leaves.index("perceptual_hash")
            stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)]
            missing = (sum(s.null_count for s in stats) if all(s is not None and s.has_null_count for s in stats)
                       else pq.read_table(path, columns=["perceptual_hash"])["perceptual_hash"].null_count)
        if missing:
            total += missing
            where.append(batch)
    return total, where


def copy_threshold_for(layout: DataLayout, batches: list[str], by_hand: float | None,
                       look_alike: float) -> tuple[float, str, CopyThreshold | None]:
    """(the copy threshold, where it comes from in words, the learnt result): set by hand, else the one
    learnt for the collection's model (the copy_threshold asset), else the look-alike threshold."""
    if by_hand is not None:
        return by_hand, "set by hand (CLIP_ASSETS_COPY_THRESHOLD)", None
    model = collection_model(layout, batches)
    learnt = CopyThreshold.load(layout.copy_threshold_path)
    if learnt is not None and learnt.model == model and learnt.threshold is not None:
        return learnt.threshold, f"learnt for {model}", learnt
    why = learnt.why if learnt is not None and learnt.model == model else \
        f"none learnt for {model} yet (materialize copy_threshold)"
    return look_alike, f"the look-alike threshold: {why}", learnt


def compute_duplicate_groups(layout: DataLayout, batches: list[str], threshold: float = DEFAULT_THRESHOLD,
                             copy_threshold: float | None = None, hash_distance: int = DEFAULT_HASH_DISTANCE,
                             image_root: Path | StoreRoot | None = None) -> tuple[DuplicatesSummary, pa.Table]:
    """Bring the pair files up to date for `batches` (the whole collection) and form the groups of every
    tier: the summary and the rows for DuckDB's duplicate_groups, not written yet. `copy_threshold`:
    set by hand; None: the learnt one (see copy_threshold_for). `image_root`: where the files' sizes in
    pixels and the copies' colour layouts are read (None: neither is read, and copies are confirmed by
    the hash alone)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"the look-alike threshold is a cosine similarity in (0, 1], got {threshold}")
    if copy_threshold is not None and not 0 < copy_threshold <= 1:
        raise ValueError(f"the copy threshold is a cosine similarity in (0, 1], got {copy_threshold}")
    copy_t, source, learnt = copy_threshold_for(layout, batches, copy_threshold, threshold)
    rules = Rules(threshold, copy_t, hash_distance)
    summary = update_pairs(layout, batches, rules)
    summary.copy_threshold, summary.copy_threshold_source, summary.learnt = copy_t, source, learnt
    summary.hash_distance = hash_distance
    started = time.perf_counter()
    pairs = current_pairs(layout, summary.indexed_batches)
    exact = exact_copies(layout, [b for b in batches if layout.embeddings_path(b).is_file()], summary.damaged)
    involved: dict[str, set[str]] = {}
    for batch_column, id_column in (("batch", "image_id"), ("other_batch", "other_image_id")):
        for batch, image_id in zip(pairs[batch_column].to_pylist(), pairs[id_column].to_pylist()):
            involved.setdefault(batch, set()).add(image_id)
    for members in exact:
        for batch, image_id in members:
            involved.setdefault(batch, set()).add(image_id)
    manifest = image_rows(layout, involved, ["path", "size", "mtime"])
    colour_agrees = None
    if image_root is not None:
        colour_agrees, summary.refused_by_colour, summary.colour_unreadable = colour_confirmation(
            pairs, rules, image_root, manifest)
    tiered = tiered_groups(pairs, exact, rules,
                           order=lambda image: (image[0], manifest.get(image[1], {}).get("path", ""), image[1]),
                           colour_agrees=colour_agrees)
    grouped: dict[str, set[str]] = {}
    for g in tiered.groups:
        for batch, image_id in g:
            grouped.setdefault(batch, set()).add(image_id)
    fingerprints, hashes = _content_of(layout, grouped)
    rows = group_rows(layout, tiered, manifest, rules, fingerprints, hashes, image_root)
    summary.without_hash, summary.without_hash_batches = images_without_hash(layout, summary.indexed_batches)
    summary.pairs, summary.groups, summary.images_in_groups = pairs.num_rows, len(tiered.groups), rows.num_rows
    summary.groups_by_tier = {t: tiered.tiers.count(t) for t in TIERS}
    summary.images_by_tier = {t: sum(len(g) for g, tt in zip(tiered.groups, tiered.tiers) if tt == t) for t in TIERS}
    summary.seconds += time.perf_counter() - started
    sizes = Counter(rows["group_id"].to_pylist())
    first = {r["group_id"]: (r["path"], r["tier"]) for r in rows.select(["group_id", "position", "path", "tier"]).to_pylist()
             if r["position"] == 0}
    summary.largest = [{"tier": first[gid][1], "first_path": first[gid][0], "images": n}
                       for gid, n in sorted(sizes.items(), key=lambda x: (TIERS.index(first[x[0]][1]), -x[1],
                                                                           first[x[0]][0]))[:10]]
    return summary, rows


def update_duplicate_groups(layout: DataLayout, batches: list[str], threshold: float = DEFAULT_THRESHOLD,
                            copy_threshold: float | None = None, hash_distance: int = DEFAULT_HASH_DISTANCE,
                            image_root: Path | StoreRoot | None = None) -> DuplicatesSummary:
    """compute_duplicate_groups, then DuckDB's duplicate_groups replaced with the groups in one transaction."""
    summary, rows = compute_duplicate_groups(layout, batches, threshold, copy_threshold, hash_distance, image_root)
    replace_duplicate_groups(layout.duckdb_path, rows)
    return summary
