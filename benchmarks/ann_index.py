"""The approximate index at scale: build time, size per vector, p50 latency and recall@10 against exact.

Synthetic clustered vectors (benchmarks/ann_data.py, never uniform noise) are written a chunk at a
time as the pipeline lays out a batch's search rows (raw float32 rows, one file per batch), so the
full matrix is never held: 10,000,000 x 512 is 20 GB. Then:

1. ground truth: the exact top-10 of each held-out query, streaming over every file (cached);
2. exact search: what one query costs scoring every stored vector (the `--exact` path);
3. the codec (clip_assets.search.ann_index.train_codec) trained once on a sample drawn across the files,
   then one shard per batch file filled from it (fill_shard): timed, with the index size;
4. queries one at a time over all shards (quantised once, each shard scanning its part of the same
   lists, candidates merged, then re-ranked exactly from the float32 files): p50 / p90 latency and
   recall@10 for a few settings. Each setting runs twice: "first" reads candidate rows the process
   has not read before (from disk where the page cache does not hold them; `--drop-caches`, as
   root, empties the page cache first), "again" repeats the same queries (those rows cached).

Everything runs on the threads given (default 2), on whatever else the machine is doing: the load
average is printed with the figures.

    uv run python benchmarks/ann_index.py --vectors 1000000                  # minutes
    uv run python benchmarks/ann_index.py --vectors 10000000 --dir /big/disk # 20 GB of vectors, ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ann_data import CHUNK_ROWS, DIM, QUERY_STREAM, ClusteredVectors  # noqa: E402

K = 10


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} {five:.1f} {fifteen:.1f} on {os.cpu_count()} cores"


def write_vectors(out: Path, vectors: int, shard_rows: int, seed: int) -> list[Path]:
    """One float32 file per shard of `shard_rows` rows; files already complete are kept."""
    if shard_rows % CHUNK_ROWS:
        raise SystemExit(f"--shard-rows must be a multiple of {CHUNK_ROWS}")
    out.mkdir(parents=True, exist_ok=True)
    gen = ClusteredVectors(seed=seed)
    paths = []
    for s in range(-(-vectors // shard_rows)):
        rows = min(shard_rows, vectors - s * shard_rows)
        path = out / f"batch-{s:05d}.f32"
        paths.append(path)
        if path.is_file() and path.stat().st_size == rows * DIM * 4:
            continue
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for start in range(0, rows, CHUNK_ROWS):
                number = (s * shard_rows + start) // CHUNK_ROWS
                f.write(gen.chunk(number, min(CHUNK_ROWS, rows - start)).tobytes())
        os.replace(tmp, path)
    return paths


def mapped(path: Path) -> np.ndarray:
    return np.memmap(path, np.float32, "r", shape=(path.stat().st_size // (DIM * 4), DIM))


def exact_top_k(queries: np.ndarray, paths: list[Path], k: int, chunk_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """(scores, global rows) of the exact top-k of each query, one chunk of one file at a time."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    offset = 0
    for path in paths:
        vectors = mapped(path)
        for start in range(0, len(vectors), chunk_rows):
            scores = queries @ np.asarray(vectors[start:start + chunk_rows]).T
            take = min(k, scores.shape[1])
            top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
            best_s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], 1)
            best_i = np.concatenate([best_i, top + offset + start], 1)
            order = np.argsort(-best_s, axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
        offset += len(vectors)
    return best_s, best_i


def ground_truth(work: Path, queries: np.ndarray, paths: list[Path], vectors: int) -> np.ndarray:
    cached = work / f"truth-{vectors}-{len(queries)}.npy"
    if cached.is_file():
        return np.load(cached)
    t = time.perf_counter()
    truth = exact_top_k(queries, paths, K)[1]
    np.save(cached, truth)
    print(f"exact top-{K} of {len(queries)} queries (the ground truth): {time.perf_counter() - t:.0f} s, streamed")
    return truth


def recall_at_k(found: list[np.ndarray], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / K for f, t in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--shard-rows", type=int, default=100_000, help="vectors per batch shard (default 100,000)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", default="32:200,64:300,96:500,128:500,192:1000",
                        help="nprobe:candidates pairs to measure (candidates re-ranked exactly)")
    parser.add_argument("--exact-queries", type=int, default=3, help="queries timed on the exact path")
    parser.add_argument("--dir", type=Path, help="keep vectors, ground truth and shards here (default: a temp dir)")
    parser.add_argument("--reuse-shards", action="store_true", help="keep the codec and shards built by an earlier run")
    parser.add_argument("--drop-caches", action="store_true", help="empty the page cache before each setting (root)")
    parser.add_argument("--prepare-only", action="store_true", help="write vectors and ground truth, then stop")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    with tempfile.TemporaryDirectory(prefix="ann-bench-") as tmp:
        work = args.dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"{args.vectors:,} x {DIM} clustered vectors in shards of {args.shard_rows:,}; {args.threads} threads; {load()}")
        t = time.perf_counter()
        paths = write_vectors(work / f"vectors-{args.shard_rows}", args.vectors, args.shard_rows, args.seed)
        print(f"vectors ready in {len(paths)} float32 files ({sum(p.stat().st_size for p in paths) / 2**30:.1f} GiB): "
              f"{time.perf_counter() - t:.0f} s")
        queries = ClusteredVectors(seed=args.seed).chunk(0, args.queries, stream=QUERY_STREAM)
        truth = ground_truth(work, queries, paths, args.vectors)
        if args.prepare_only:
            return
        run_index_benchmark(args, work, paths, queries, truth)


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1")


def run_index_benchmark(args, work: Path, paths: list[Path], queries: np.ndarray, truth: np.ndarray) -> None:
    import faiss

    from clip_assets.search import ann_index, shard_set

    faiss.omp_set_num_threads(args.threads)
    times, cpu = [], []
    for q in queries[: args.exact_queries]:
        t, c = time.perf_counter(), time.process_time()
        exact_top_k(q[None], paths, K)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    if times:
        print(f"exact search, one query over all {args.vectors:,}: p50 {statistics.median(times) * 1e3:,.0f} ms "
              f"({statistics.median(cpu) * 1e3:,.0f} ms CPU; {len(times)} queries)")

    shard_dir = work / f"codec-shards-{args.shard_rows}"
    shard_dir.mkdir(exist_ok=True)
    codec_path = shard_dir / "codec.faiss"
    if not (args.reuse_shards and codec_path.is_file()):
        for old in shard_dir.glob("*.faiss"):
            old.unlink()
        t, c = time.perf_counter(), time.process_time()
        factory = ann_index.codec_factory(args.vectors, DIM)
        wanted = min(args.vectors, ann_index.codec_lists(args.vectors) * ann_index.TRAINING_POINTS_PER_LIST * 2)
        rng = np.random.default_rng(args.seed)
        sources = paths if len(paths) <= ann_index.MAX_TRAINING_BATCHES else \
            [paths[i] for i in sorted(rng.choice(len(paths), ann_index.MAX_TRAINING_BATCHES, replace=False))]
        sample = np.concatenate([np.asarray(mapped(p)[np.sort(rng.choice(len(mapped(p)), wanted // len(sources), replace=False))])
                                 for p in sources])
        ann_index.train_codec(sample, args.vectors, codec_path)
        print(f"codec {factory} trained on {len(sample):,} vectors from {len(sources)} files: "
              f"{time.perf_counter() - t:,.0f} s ({time.process_time() - c:,.0f} CPU s)", flush=True)
    codec = shard_set.read_faiss(codec_path)
    t, c = time.perf_counter(), time.process_time()
    built = 0
    for path in paths:
        target = shard_dir / f"{path.stem}.faiss"
        if args.reuse_shards and target.is_file():
            continue
        ann_index.fill_shard(codec, mapped(path), target)
        built += 1
    build_s, build_cpu = time.perf_counter() - t, time.process_time() - c
    index_bytes = sum((shard_dir / f"{p.stem}.faiss").stat().st_size for p in paths)
    if built:
        print(f"filled {built} shards of {args.shard_rows:,} in {build_s:,.0f} s ({build_cpu:,.0f} CPU s; "
              f"{build_s / built:.1f} s per new batch, {built * args.shard_rows / build_s:,.0f} vectors/s)")
    print(f"index {index_bytes / 2**20:,.0f} MiB = {index_bytes / args.vectors:.1f} bytes per vector "
          f"(+ {DIM * 4} bytes of float32 per vector on disk for re-ranking); {load()}")

    t = time.perf_counter()
    shards = shard_set.ShardSet([shard_set.Shard(p.stem, mapped(p), shard_set.read_faiss(shard_dir / f"{p.stem}.faiss"),
                                                 "codec") for p in paths], threads=args.threads)
    print(f"opened {len(paths)} shards in {time.perf_counter() - t:.1f} s (read into memory; a search process keeps them open)")
    offsets = np.cumsum([0] + [len(s.vectors) for s in shards.shards])
    print(f"{'nprobe':>6} {'candidates':>10} {'pass':>6} {'p50 ms':>8} {'p90 ms':>8} {'recall@10':>9}")
    for setting in args.settings.split(","):
        nprobe, candidates = (int(x) for x in setting.split(":"))
        if args.drop_caches:
            drop_page_cache()
        for label in ("first", "again"):
            lat, found = [], []
            for q in queries:
                t = time.perf_counter()
                _, shard_no, rows = shards.top_k(q[None], K, nprobe=nprobe, candidates=candidates)
                lat.append(time.perf_counter() - t)
                found.append(offsets[shard_no[0]] + rows[0])
            print(f"{nprobe:>6} {candidates:>10} {label:>6} {np.percentile(lat, 50) * 1e3:8.2f} "
                  f"{np.percentile(lat, 90) * 1e3:8.2f} {recall_at_k(found, truth):9.3f}", flush=True)
    print(load())


if __name__ == "__main__":
    main()
