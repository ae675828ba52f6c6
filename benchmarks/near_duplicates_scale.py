"""The near_duplicates step on 1,000,000 synthetic embeddings: time and memory.

`prepare` writes the collection in the project's own layout, as the embedding step would have
(clip_assets_tests/support/synthetic_embeddings.py: clustered unit vectors, random perceptual hashes),
in batches of `--per-batch` rows, then plants duplicates in the last batch: `--copies` rows replaced
by copies of rows of the first batch (the vector moved slightly, cosine about 0.99; the hash with 0-4
bits flipped), `--exact` rows given the fingerprint, vector and hash of another row, and `--look-alikes`
rows moved closer (cosine about 0.96) with an unrelated hash. Then it builds every batch's index shard
(the codec trained on the first).

`run` is the step itself, `clip_assets.search.near_duplicates.update_duplicate_groups` from scratch
(no pair file yet: every batch queried against every shard, NEIGHBOURS candidates per image and
shard), with the copy threshold given (learning it needs images: see docs/near_duplicates.md), and
prints the tiers found against those planted. Measure it with GNU time:

    uv run python benchmarks/near_duplicates_scale.py prepare --work /tmp/nd1m
    /usr/bin/time -v uv run python benchmarks/near_duplicates_scale.py run --work /tmp/nd1m
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from clip_assets.config.layout import DataLayout  # noqa: E402
from clip_assets.search import ann_index  # noqa: E402
from clip_assets.search.near_duplicates import update_duplicate_groups  # noqa: E402
from clip_assets.storage.atomic_files import write_parquet_atomically  # noqa: E402
from clip_assets_tests.support.synthetic_embeddings import write_synthetic_batch  # noqa: E402

MODEL = "synthetic/near-duplicates"


def batches(args) -> list[str]:
    return [f"batch-{b:03d}" for b in range(args.images // args.per_batch)]


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def moved(rng: np.random.Generator, v: np.ndarray, cosine: float) -> np.ndarray:
    """Unit vectors at about `cosine` from `v`."""
    noise = unit(rng.standard_normal(v.shape).astype(np.float32))
    noise -= (noise * v).sum(1, keepdims=True) * v
    noise = unit(noise)
    return unit(cosine * v + np.sqrt(1 - cosine**2) * noise)


def prepare(args) -> None:
    layout = DataLayout(Path(args.work) / "data")
    names = batches(args)
    started = time.perf_counter()
    for k, batch in enumerate(names):
        write_synthetic_batch(layout, batch, args.per_batch, args.dim, MODEL, seed=k)
    print(
        f"wrote {len(names)} batches x {args.per_batch:,} rows of dimension {args.dim} in "
        f"{time.perf_counter() - started:.0f} s"
    )
    rng = np.random.default_rng(7)
    first = pq.read_table(layout.embeddings_path(names[0]))
    last_path = layout.embeddings_path(names[-1])
    last = pq.read_table(last_path)
    vectors = last["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, args.dim).copy()
    source = first["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, args.dim)
    hashes = last["perceptual_hash"].to_numpy().copy()
    fingerprints = last["fingerprint"].to_pylist()
    n_copy, n_exact, n_look = args.copies, args.exact, args.look_alikes
    picked = rng.choice(len(source), n_copy + n_exact + n_look, replace=False)
    copy_rows = np.arange(n_copy)
    exact_rows = np.arange(n_copy, n_copy + n_exact)
    look_rows = np.arange(n_copy + n_exact, n_copy + n_exact + n_look)
    src_hash = first["perceptual_hash"].to_numpy()
    src_fp = first["fingerprint"].to_pylist()
    vectors[copy_rows] = moved(rng, source[picked[copy_rows]], 0.99)
    flips = rng.integers(0, 5, n_copy)
    hashes[copy_rows] = [
        h ^ int(sum(1 << int(b) for b in rng.choice(63, f, replace=False)))
        for h, f in zip(src_hash[picked[copy_rows]], flips)
    ]
    vectors[exact_rows] = source[picked[exact_rows]]
    hashes[exact_rows] = src_hash[picked[exact_rows]]
    for row, src in zip(exact_rows, picked[exact_rows]):
        fingerprints[row] = src_fp[src]
    vectors[look_rows] = moved(rng, source[picked[look_rows]], 0.96)
    table = last.set_column(
        last.schema.get_field_index("embedding"),
        "embedding",
        pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), args.dim),
    )
    table = table.set_column(table.schema.get_field_index("perceptual_hash"), "perceptual_hash", pa.array(hashes))
    table = table.set_column(table.schema.get_field_index("fingerprint"), "fingerprint", pa.array(fingerprints))
    write_parquet_atomically(table.cast(last.schema), last_path)
    print(f"planted {n_copy:,} copies, {n_exact:,} exact copies and {n_look:,} look-alikes in {names[-1]}")
    started = time.perf_counter()
    for batch in names:
        s = ann_index.build_batch_shard(layout, batch)
        print(f"  shard {batch}: {s.kind}, {s.build_s:.1f} s" + (" (codec trained)" if s.codec_trained else ""))
    print(f"built {len(names)} index shards in {time.perf_counter() - started:.0f} s")


def run(args) -> None:
    layout = DataLayout(Path(args.work) / "data")
    names = batches(args)
    for stale in layout.duplicate_pairs_dir.glob("*.parquet") if layout.duplicate_pairs_dir.is_dir() else []:
        stale.unlink()  # from scratch: every batch queried
    started = time.perf_counter()
    summary = update_duplicate_groups(layout, names, threshold=0.95, copy_threshold=args.copy_threshold)
    wall = time.perf_counter() - started
    print(f"near_duplicates over {args.images:,} embeddings ({len(names)} batches): {wall:.1f} s wall")
    print(
        f"  pairs {summary.pairs:,}; groups by tier {summary.groups_by_tier}; images by tier {summary.images_by_tier}"
    )
    print(f"  planted: {args.exact:,} exact copies, {args.copies:,} copies, {args.look_alikes:,} look-alikes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["prepare", "run"])
    parser.add_argument("--work", required=True)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--per-batch", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--copies", type=int, default=5_000)
    parser.add_argument("--exact", type=int, default=1_000)
    parser.add_argument("--look-alikes", type=int, default=2_000)
    parser.add_argument("--copy-threshold", type=float, default=0.98)
    args = parser.parse_args()
    prepare(args) if args.phase == "prepare" else run(args)


if __name__ == "__main__":
    main()
