"""Writers on several machines: DuckLake (catalog in Postgres, parquet on the store) against per-batch
parquet files on the store with DuckDB views over them, measured in one run on one machine.

K concurrent writer processes (K = 1, 4, 8 by default) each commit one batch's classification rows
(the real schema, `--rows` per batch, 20 categories), first as new batches, then each rewriting its
own batch; then a reader runs `category_counts` over every batch. Per design and K: the writers' wall
time from one start signal to the last commit, the slowest and median commit, retries after a
conflict, the reader's time, and the requests the S3 server answered (by method) for the writes and
for the read.

The store is moto's S3 server in this process on loopback; DuckLake's catalog is a throwaway Postgres
(Debian's, as the tests start it: clip_assets_tests/support/postgres_server.py). DuckDB 2.0 (this
project's) cannot load DuckLake, httpfs or the Postgres scanner (the registry's extension wheels stop
at DuckDB 1.5.5 and a 1.5.5 extension refuses to load in 2.0), so the DuckLake side runs in a side venv
with duckdb 1.5.5 and those three wheels, loaded from the wheels' files (never downloaded):

    uv venv /tmp/ducklake-venv && VIRTUAL_ENV=/tmp/ducklake-venv uv pip install duckdb==1.5.5 \\
        duckdb-extension-ducklake==1.5.5 duckdb-extension-postgres-scanner==1.5.5 \\
        duckdb-extension-httpfs==1.5.5 pyarrow
    uv run python benchmarks/writers_on_a_store.py [--writers 1 4 8] [--rows 50000] \\
        [--ducklake-python /tmp/ducklake-venv/bin/python]

The parquet side writes each batch as one object (a single PUT: the object store's atomic replace)
with pyarrow and s3fs, and reads through DuckDB 2.0 with s3fs registered as its filesystem.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

BUCKET = "bench"
ACCESS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
CATEGORIES = 20

CLASSIFICATION_COLUMNS = """
    batch VARCHAR NOT NULL, image_id VARCHAR NOT NULL, category VARCHAR NOT NULL, mode VARCHAR NOT NULL,
    pos_sim FLOAT, neg_sim FLOAT, neutral_sim FLOAT, score FLOAT, probability FLOAT, rank SMALLINT,
    threshold DOUBLE, neutral_margin DOUBLE, matched BOOLEAN, model VARCHAR, prompt_version VARCHAR,
    adapter_version VARCHAR, model_matched BOOLEAN, rule_matched BOOLEAN, decided_by VARCHAR
"""
CATEGORY_COLUMNS = "category VARCHAR, position INTEGER, mode VARCHAR"
CATEGORY_COUNTS = """
SELECT p.category, p.mode, count(c.image_id) AS images_classified,
       count(c.image_id) FILTER (WHERE c.matched) AS images_matched
FROM {categories} p LEFT JOIN {classifications} c USING (category)
GROUP BY p.category, p.mode, p.position ORDER BY p.position
"""


# ---------------------------------------------------------------- the rows


def batch_rows(batch: str, rows: int) -> pa.Table:
    """One batch's classification rows in the project's schema (clip_assets.classification.rules)."""
    import numpy as np

    from clip_assets.classification.rules import CLASSIFICATION_SCHEMA

    rng = np.random.default_rng(abs(hash(batch)) % 2**32)
    images = rows // CATEGORIES
    image_ids = np.repeat([f"{batch}-{i:07d}" for i in range(images)], CATEGORIES)
    categories = np.tile([f"category_{c:02d}" for c in range(CATEGORIES)], images)
    n = images * CATEGORIES
    score = rng.normal(0, 0.05, n).astype(np.float32)
    matched = score > 0.03
    columns = {
        "batch": [batch] * n, "image_id": image_ids, "category": categories, "mode": ["multi_label"] * n,
        "pos_sim": rng.uniform(0.1, 0.3, n).astype(np.float32), "neg_sim": rng.uniform(0.1, 0.3, n).astype(np.float32),
        "neutral_sim": rng.uniform(0.1, 0.3, n).astype(np.float32), "score": score,
        "probability": pa.nulls(n, pa.float32()), "rank": pa.nulls(n, pa.int16()), "threshold": np.full(n, 0.03),
        "neutral_margin": np.full(n, 0.01), "matched": matched, "model": ["bench-model"] * n,
        "prompt_version": ["v1"] * n, "adapter_version": ["none"] * n, "model_matched": matched,
        "rule_matched": matched, "decided_by": ["rule"] * n,
    }  # fmt: skip
    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    return table.cast(
        pa.schema([f.with_type(pa.string()) if pa.types.is_dictionary(f.type) else f for f in CLASSIFICATION_SCHEMA])
    )


def category_rows() -> pa.Table:
    return pa.table(
        {
            "category": [f"category_{c:02d}" for c in range(CATEGORIES)],
            "position": pa.array(range(CATEGORIES), pa.int32()),
            "mode": ["multi_label"] * CATEGORIES,
        }
    )


# ---------------------------------------------------------------- workers (each its own process)


def _ducklake_connection(args: dict):
    """A DuckDB 1.5.5 connection with DuckLake attached: extensions LOADed from the wheels' files."""
    import duckdb

    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    for name in ("httpfs", "postgres_scanner", "ducklake"):
        module = __import__(f"duckdb_extension_{name}")
        found = next(Path(module.__file__).parent.rglob(f"{name}.duckdb_extension"))
        con.execute(f"LOAD '{found}'")
    con.execute(
        f"CREATE SECRET (TYPE s3, KEY_ID 'testing', SECRET 'testing', REGION 'us-east-1', "
        f"ENDPOINT '{args['endpoint']}', URL_STYLE 'path', USE_SSL false)"
    )
    con.execute(f"ATTACH 'ducklake:postgres:{args['catalog']}' AS lake (DATA_PATH 's3://{BUCKET}/lake/')")
    return con


def _is_conflict(exc: Exception) -> bool:
    text = str(exc).lower()
    return "conflict" in text or "retry" in text or "could not serialize" in text or "duplicate key" in text


def worker(design: str, args: dict) -> None:
    """Load the batch's rows, say ready, wait for 'go' on stdin, commit; print the timings as JSON."""
    rows = pq.read_table(args["rows_file"])
    retries = 0
    connecting = time.perf_counter()
    if design == "ducklake":
        import duckdb

        con = _ducklake_connection(args)
    else:
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=f"http://{args['endpoint']}", key="testing", secret="testing")
        fs.info(BUCKET)  # the client is made once per process: here, as DuckLake's ATTACH is
    connect_s = time.perf_counter() - connecting
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    if design == "ducklake":
        while True:
            try:
                con.begin()
                con.execute("DELETE FROM lake.image_classifications WHERE batch = ?", [args["batch"]])
                con.register("new_rows", rows)
                con.execute("INSERT INTO lake.image_classifications SELECT * FROM new_rows")
                con.commit()
                break
            except duckdb.Error as exc:
                with contextlib.suppress(duckdb.Error):  # nothing to roll back when the commit itself failed
                    con.rollback()
                if not _is_conflict(exc) or retries >= 50:
                    raise
                retries += 1
                time.sleep(0.01 * retries)
    else:
        buffer = io.BytesIO()
        pq.write_table(rows, buffer)
        fs.pipe_file(f"{BUCKET}/warehouse/classifications/{args['batch']}.parquet", buffer.getvalue())
    print(
        json.dumps(
            {
                "commit_s": time.perf_counter() - started,
                "retries": retries,
                "connect_s": connect_s,
                "ended": time.time(),
            }
        ),
        flush=True,
    )


def reader(design: str, args: dict) -> None:
    """category_counts over every batch: the connection (imports, client, ATTACH) and the query timed apart."""
    started = time.perf_counter()
    if design == "ducklake":
        con = _ducklake_connection(args)
        connect_s = time.perf_counter() - started
        result = con.execute(
            CATEGORY_COUNTS.format(categories="lake.prompt_categories", classifications="lake.image_classifications")
        ).fetchall()
    else:
        import duckdb
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=f"http://{args['endpoint']}", key="testing", secret="testing")
        fs.info(BUCKET)
        con = duckdb.connect()
        con.register_filesystem(fs)
        connect_s = time.perf_counter() - started
        files = sorted("s3://" + p for p in fs.glob(f"{BUCKET}/warehouse/classifications/*.parquet"))
        listing = ", ".join(f"'{f}'" for f in files)
        result = con.execute(
            CATEGORY_COUNTS.format(
                categories=f"read_parquet('s3://{BUCKET}/warehouse/prompt_categories.parquet')",
                classifications=f"read_parquet([{listing}])",
            )
        ).fetchall()
    query_s = time.perf_counter() - started - connect_s
    print(json.dumps({"read_connect_s": connect_s, "read_s": query_s, "classified": sum(r[2] for r in result)}),
          flush=True)  # fmt: skip


def setup(design: str, args: dict) -> None:
    """Empty tables (DuckLake) or the categories file (parquet)."""
    if design == "ducklake":
        con = _ducklake_connection(args)
        con.execute("DROP TABLE IF EXISTS lake.image_classifications")
        con.execute("DROP TABLE IF EXISTS lake.prompt_categories")
        con.execute(f"CREATE TABLE lake.image_classifications ({CLASSIFICATION_COLUMNS})")
        con.execute(f"CREATE TABLE lake.prompt_categories ({CATEGORY_COLUMNS})")
        con.register("cats", pq.read_table(args["categories_file"]))
        con.execute("INSERT INTO lake.prompt_categories SELECT * FROM cats")
    else:
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=f"http://{args['endpoint']}", key="testing", secret="testing")
        buffer = io.BytesIO()
        pq.write_table(pq.read_table(args["categories_file"]), buffer)
        fs.pipe_file(f"{BUCKET}/warehouse/prompt_categories.parquet", buffer.getvalue())


# ---------------------------------------------------------------- the run


class CountingStore:
    """moto's S3 server on loopback, counting the requests it answers by method."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        app = DomainDispatcherApplication(create_backend_app)

        def counting(environ, start_response):
            with self._lock:
                self.counts[environ["REQUEST_METHOD"]] += 1
            return app(environ, start_response)

        class Quiet(MotoRequestHandler):
            def log_request(self, *args, **kwargs) -> None:
                pass

        self._server = make_server("127.0.0.1", 0, counting, threaded=True, request_handler=Quiet)
        self.endpoint = f"127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def take(self) -> Counter[str]:
        with self._lock:
            counts, self.counts = self.counts, Counter()
        return counts


def _python(design: str, options) -> str:
    return options.ducklake_python if design == "ducklake" else sys.executable


def _run_one(design: str, role: str, args: dict, options) -> dict:
    out = subprocess.run([_python(design, options), __file__, "--role", role, "--design", design,
                          "--args", json.dumps(args)], check=False, capture_output=True, text=True, env=_env())  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{design} {role} failed:\n{out.stderr[-3000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def _env() -> dict:
    return {**os.environ, **ACCESS, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _writers(design: str, batches: list[str], base: dict, rows_files: dict, options) -> dict:
    """Start one writer process per batch, wait until every one is ready, say go to all at once."""
    procs = []
    for batch in batches:
        args = {**base, "batch": batch, "rows_file": str(rows_files[batch])}
        procs.append(subprocess.Popen([_python(design, options), __file__, "--role", "writer", "--design", design,
                                       "--args", json.dumps(args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=_env()))  # fmt: skip
    for proc in procs:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"{design} writer did not start: {line}{proc.stderr.read()[-3000:]}")
    started = time.time()
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{design} writer failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    commits = [r["commit_s"] for r in results]
    return {"wall_s": max(r["ended"] for r in results) - started, "median_commit_s": statistics.median(commits),
            "max_commit_s": max(commits), "retries": sum(r["retries"] for r in results),
            "connect_s": statistics.median(r["connect_s"] for r in results)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rows", type=int, default=50_000, help="classification rows per batch")
    parser.add_argument("--ducklake-python", default="/tmp/ducklake-venv/bin/python")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--design", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.role:
        {"writer": worker, "reader": reader, "setup": setup}[options.role](options.design, json.loads(options.args))
        return

    import psycopg2
    import s3fs

    from clip_assets_tests.support import postgres_server

    os.environ.update(ACCESS)
    store = CountingStore()
    s3fs.S3FileSystem(endpoint_url=f"http://{store.endpoint}", key="testing", secret="testing").mkdir(BUCKET)
    server = postgres_server.start()
    try:
        with tempfile.TemporaryDirectory() as scratch_dir:
            scratch = Path(scratch_dir)
            categories_file = scratch / "categories.parquet"
            pq.write_table(category_rows(), categories_file)
            batches = [f"batch_{i:02d}" for i in range(max(options.writers))]
            rows_files = {}
            for batch in batches:
                rows_files[batch] = scratch / f"{batch}.parquet"
                pq.write_table(batch_rows(batch, options.rows), rows_files[batch])
            print(
                f"{options.rows:,} classification rows per batch; DuckLake: duckdb 1.5.5 (side venv), catalog "
                f"in Postgres; parquet: duckdb {__import__('duckdb').__version__} + s3fs; store: moto S3 on loopback"
            )
            header = (
                f"{'design':<9} {'K':>2} {'round':<8} {'connect':>7} {'wall s':>7} {'median':>7} {'slowest':>7} "
                f"{'retries':>7} {'requests (writes)':<30} {'read conn':>9} {'query s':>7} {'requests (read)':<20}"
            )
            print(header)
            print("-" * len(header))
            summary: dict[tuple[str, int], dict] = {}
            for k in options.writers:
                for design in ("ducklake", "parquet"):
                    con = psycopg2.connect(server.dsn("postgres"))
                    con.autocommit = True
                    con.cursor().execute(f"DROP DATABASE IF EXISTS lake_{k}")
                    con.cursor().execute(f"CREATE DATABASE lake_{k}")
                    con.close()
                    s3 = s3fs.S3FileSystem(endpoint_url=f"http://{store.endpoint}", key="testing", secret="testing")
                    for prefix in ("lake", "warehouse"):
                        if s3.exists(f"{BUCKET}/{prefix}"):
                            s3.rm(f"{BUCKET}/{prefix}", recursive=True)
                    base = {
                        "endpoint": store.endpoint,
                        "categories_file": str(categories_file),
                        "catalog": f"dbname=lake_{k} host={server.host} port={server.port} user=postgres",
                    }
                    _run_one(design, "setup", base, options)
                    for round_name in ("new", "rewrite"):
                        store.take()
                        written = _writers(design, batches[:k], base, rows_files, options)
                        write_requests = store.take()
                        read = _run_one(design, "reader", base, options)
                        read_requests = store.take()
                        expected = k * (options.rows // CATEGORIES) * CATEGORIES
                        assert read["classified"] == expected, (design, k, read, expected)
                        fmt = lambda c: " ".join(f"{m}={n}" for m, n in sorted(c.items()))
                        print(f"{design:<9} {k:>2} {round_name:<8} {written['connect_s']:>7.2f} {written['wall_s']:>7.2f} "
                              f"{written['median_commit_s']:>7.2f} {written['max_commit_s']:>7.2f} "
                              f"{written['retries']:>7} {fmt(write_requests):<30} {read['read_connect_s']:>9.2f} {read['read_s']:>7.2f} "
                              f"{fmt(read_requests):<20}", flush=True)  # fmt: skip
                        summary[(design, k, round_name)] = {**written, **read}
            print()
            for k in options.writers:
                for round_name in ("new", "rewrite"):
                    lake, files = summary[("ducklake", k, round_name)], summary[("parquet", k, round_name)]
                    print(
                        f"K={k} {round_name:<8}: DuckLake / parquet: writers' wall time "
                        f"{lake['wall_s'] / files['wall_s']:.1f}x, query {lake['read_s'] / files['read_s']:.1f}x"
                    )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
