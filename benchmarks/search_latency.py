"""How long one exact search query takes over 1,000,000 stored embeddings, streaming vs a full load.

Writes N random unit embeddings of dimension D as the pipeline lays them out (one parquet file per
batch under <dir>/embeddings/, the pipeline's schema), then runs one query each way in a fresh
subprocess, so each figure's peak memory (ru_maxrss) is its own:

- first query: `clip_assets.search.exact_search.top_k_streaming` when no search rows exist yet: it streams
  every parquet file once to build the search rows (search_index/<batch>.f32), then answers;
- streaming: `top_k_streaming` over the built search rows (mapped, a chunk at a time, running top-k):
  what every later query costs;
- streaming from parquet: `top_k_streaming(use_search_rows=False)`, record batches decoded from the
  parquet files themselves, running top-k (the fallback for a read-only data directory);
- naive: read every file into one (N, D) matrix, then one matrix-vector product and a top-k.

CPU seconds (user + system, all threads) are printed beside the wall-clock figure: on a shared,
busy machine they say more about the cost of a query than the wall clock does.

Each way but the first query runs a few times after one warm-up (the files are then in the page
cache, as they are on a search server) and reports the median. Peak memory is the child process's
ru_maxrss, which includes about 100 MiB of Python, numpy and pyarrow.

    uv run python benchmarks/search_latency.py                  # 1,000,000 x 512 in 10 files
    uv run python benchmarks/search_latency.py --rows 100000    # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Not clip_assets.embedding.engine: it imports torch, whose ~700 MiB would swamp the memory figures.
from clip_assets.config.layout import DataLayout
from clip_assets.storage.arrow_vectors import vectors_matrix

MODEL = "benchmark/random"


def embeddings_schema(dim: int) -> pa.Schema:
    """The columns search reads from the pipeline's embeddings files (clip_assets.embedding.engine.embeddings_schema
    has these and the file's size, mtime and fingerprint); kept here so writing the data needs no torch."""
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("model", pa.string(), nullable=False),
        ]
    )


def write_collection(data_dir: Path, rows: int, dim: int, files: int, seed: int = 0) -> list[Path]:
    """`files` batch files of random unit vectors, written in slices so writing stays small too."""
    rng = np.random.default_rng(seed)
    out = []
    per_file = -(-rows // files)
    for f in range(files):
        n = min(per_file, rows - f * per_file)
        path = DataLayout(data_dir).embeddings_path(f"batch-{f:03d}")
        path.parent.mkdir(parents=True, exist_ok=True)
        schema = embeddings_schema(dim)
        with pq.ParquetWriter(path, schema) as writer:
            for start in range(0, n, 50_000):
                m = min(50_000, n - start)
                v = rng.standard_normal((m, dim), dtype=np.float32)
                v /= np.linalg.norm(v, axis=1, keepdims=True)
                writer.write_table(
                    pa.table(
                        {
                            "image_id": pa.array([f"{f:03d}-{start + i:07d}" for i in range(m)]),
                            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), dim),
                            "model": pa.array([MODEL] * m),
                        },
                        schema=schema,
                    )
                )
        out.append(path)
    return out


def naive_top_k(query: np.ndarray, files: list[Path], k: int) -> list[str]:
    table = pa.concat_tables(pq.read_table(p, columns=["image_id", "embedding"]) for p in files)
    matrix = vectors_matrix(table["embedding"])
    scores = matrix @ query
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.argsort(-scores[best])]
    return table["image_id"].take(pa.array(best)).to_pylist()


def streaming_top_k(query: np.ndarray, files: list[Path], k: int, use_search_rows: bool = True) -> list[str]:
    from clip_assets.search.exact_search import top_k_streaming

    return [image_id for _, image_id, _ in top_k_streaming(query, files, k, use_search_rows=use_search_rows)]


def first_query(query: np.ndarray, files: list[Path], k: int) -> list[str]:
    from clip_assets.search.search_rows import rows_path

    for path in files:
        for stale in (rows_path(path), rows_path(path).with_suffix(".json")):
            stale.unlink(missing_ok=True)
    return streaming_top_k(query, files, k)


# way -> (function, warm up first?, runs: None for --repeats). Decoding parquet is slow at 1M rows,
# so "streaming from parquet" runs once after its warm-up.
WAYS = {
    "first query": (first_query, False, 1),
    "streaming": (streaming_top_k, True, None),
    "streaming from parquet": (lambda q, f, k: streaming_top_k(q, f, k, use_search_rows=False), True, 1),
    "naive": (naive_top_k, True, None),
}


def one_way(way: str, data_dir: Path, k: int, repeats: int) -> dict:
    """Runs in the child process: warm-up, then `repeats` timed queries."""
    files = DataLayout(data_dir).embedding_files()
    dim = pq.ParquetFile(files[0]).schema_arrow.field("embedding").type.list_size
    query = np.random.default_rng(1).standard_normal(dim).astype(np.float32)
    query /= np.linalg.norm(query)
    fn, warm_up, runs = WAYS[way]
    if warm_up:
        fn(query, files, k)
    times, cpu, result = [], [], None
    for _ in range(runs or repeats):
        t, c = time.perf_counter(), time.process_time()
        result = fn(query, files, k)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {
        "way": way,
        "median_s": statistics.median(times),
        "times_s": times,
        "median_cpu_s": statistics.median(cpu),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "top": result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="reuse or create the collection here (default: a temp dir)")
    parser.add_argument("--child", choices=list(WAYS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_way(args.child, args.dir, args.k, args.repeats)))
        return

    with tempfile.TemporaryDirectory(prefix="search-bench-") as tmp:
        data_dir = args.dir or Path(tmp)
        if not DataLayout(data_dir).embedding_files():
            t = time.perf_counter()
            write_collection(data_dir, args.rows, args.dim, args.files)
            print(f"wrote {args.rows:,} unit embeddings of dimension {args.dim} in {args.files} parquet files "
                  f"({sum(p.stat().st_size for p in DataLayout(data_dir).embedding_files()) / 2**30:.2f} GiB) "
                  f"in {time.perf_counter() - t:.0f} s")
        print(f"CPU cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; one query, k={args.k}, median of {args.repeats} after a warm-up (one run where shown)")
        results = {}
        for way in WAYS:
            done = subprocess.run(
                [sys.executable, __file__, "--child", way, "--dir", str(data_dir), "-k", str(args.k),
                 "--repeats", str(args.repeats)],
                capture_output=True, text=True,
            )
            if done.returncode != 0:
                print(f"{way}: failed (exit {done.returncode}; killed for memory?)\n{done.stderr[-2000:]}")
                continue
            results[way] = r = json.loads(done.stdout.splitlines()[-1])
            print(f"{way:<23} {r['median_s']:7.3f} s per query ({r['median_cpu_s']:.3f} CPU s)   peak memory {r['peak_rss_mib']:,.0f} MiB   "
                  f"(runs: {', '.join(f'{x:.3f}' for x in r['times_s'])})")
        if results.get("naive"):
            same = all(r["top"] == results["naive"]["top"] for r in results.values())
            print(f"same top-{args.k} every way: {same}")


if __name__ == "__main__":
    main()
