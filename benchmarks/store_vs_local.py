"""The pipeline's steps with the image root and the data directory on an S3 server against a local disk, in one run.

The store is moto's S3 server on loopback (its own process, as clients reach AWS: botocore, credentials
and AWS_ENDPOINT_URL from the environment), counting every request it answers by kind (LIST, GET,
PUT, HEAD, DELETE, COPY) and the bytes it sent and received. The cases, run interleaved step by step
(local, then store) on one machine:

- local:        image root and data directory local folders, the DuckDB warehouse (the default);
- store:        image root `s3://bench/images`, data directory `s3://bench/<data>`, CLIP_ASSETS_WAREHOUSE=parquet
                (the per-batch parquet warehouse, the one for writers on several machines);
- store+duckdb: the same data directory in the store with the DuckDB warehouse, whose file stays in this
                machine's local working copy (never published): centroids and classification only (on a new
                machine it has no centroids: the run shows that classification failing).

On the 288 mixed JPEGs of the peer benchmark (embed_throughput.make_images, 640x480 up to 4000x3000,
reused from ~/.cache/clip-assets-bench/peer-corpus/photos) the steps' own functions, as the assets call
them: the manifest (write_manifest), the embedding (write_embeddings: images/s), the centroids
(write_centroids), the classification (write_classifications, with the image root for its contact
sheet), the index shard (build_batch_shard), and a text search (clip_assets.search.query.search):
first ever on the data (it saves the text tower), then in a new process with a fresh cache folder
(cold), the same search again at once (warm), and again after the store recheck window (2 s). On a
100,000-image batch of synthetic embeddings (the tiny model's dimension, written as million_batch.py
does) the same from the centroids on, and a classification in a new process with a fresh cache folder.
The manifest is also listed again in a new process with a fresh cache folder, once a search has
saved the text tower: what a re-scan on another pod downloads. Steps in this process run within
the store's recheck window (2 s) of the step before only when that step was quick: most look again.

Each step's requests are counted twice: by the client (object_store.request_counts and the image
root's RequestCounts) and by the server; a difference is printed. Then a model, from the counts alone,
of what a real bucket's latency would add to each step: every request one after another, and with the
concurrency the code has (8 GETs in flight per decode worker for the images; everything else is one
request at a time). An estimate, not a measurement: bandwidth is left out (the bytes are printed).

    nice -n 5 uv run python benchmarks/store_vs_local.py [--images 288] [--synthetic 100000] [--categories 10]

The machine's load average is printed at start and end: read the times beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path.home() / ".cache" / "clip-assets-bench" / "peer-corpus" / "photos"
BUCKET = "bench"
BATCH = "photos"
SYNTHETIC = "synthetic"
QUERY = "a red car on a street"
ACCESS = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
KINDS = ("LIST", "GET", "PUT", "HEAD", "DELETE", "COPY", "OTHER")
LATENCIES_MS = (20, 50)
CONCURRENT_GETS = 8  # clip_assets.storage.store_root.CONCURRENT_GETS, per decode worker


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------- the S3 server (a process of its own)


def serve() -> None:
    """moto's S3 app on a free loopback port, counting requests by kind and bytes; GET /__counts__ hands the
    counts since the last call (and resets them). Prints the port, then serves until killed."""
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()
    counts: Counter[str] = Counter()
    gets: list[list] = []  # [key, bytes sent] of each GET of an object

    def kind(environ) -> str:
        method, query = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
        key = environ.get("PATH_INFO", "/").lstrip("/").partition("/")[2]
        if method == "GET":
            return "LIST" if "list-type" in query or not key else "GET"
        if method == "PUT":
            return "COPY" if environ.get("HTTP_X_AMZ_COPY_SOURCE") else "PUT"
        if method == "POST":
            return "DELETE" if "delete" in query else "PUT"  # multipart create/complete: parts of a PUT
        return method if method in KINDS else "OTHER"

    def counting(environ, start_response):
        if environ.get("PATH_INFO") == "/__counts__":
            with lock:
                body = json.dumps({**counts, "gets": gets}).encode()
                counts.clear()
                gets.clear()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        what = kind(environ)
        with lock:
            counts[what] += 1
            counts["bytes_in"] += int(environ.get("CONTENT_LENGTH") or 0)
        out = app(environ, start_response)

        def measured():
            sent = 0
            try:
                for chunk in out:
                    sent += len(chunk)
                    yield chunk
            finally:
                with lock:
                    counts["bytes_out"] += sent
                    if what == "GET":
                        gets.append([environ.get("PATH_INFO", "").lstrip("/").partition("/")[2], sent])
                if hasattr(out, "close"):
                    out.close()

        return measured()

    class Quiet(WSGIRequestHandler):
        def log_request(self, *args, **kwargs) -> None:
            pass

    server = make_server("127.0.0.1", 0, counting, threaded=True, request_handler=Quiet)
    print(server.server_address[1], flush=True)
    server.serve_forever()


class Server:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--role", "server"], stdout=subprocess.PIPE, text=True,
                                     env=_env())  # fmt: skip
        self.endpoint = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    def take(self) -> Counter:
        """The counts since the last take; the GETs' keys and sizes under "gets" (not a kind)."""
        with urllib.request.urlopen(f"{self.endpoint}/__counts__") as response:
            return Counter(json.loads(response.read()))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, **ACCESS, "PYTHONPATH": str(REPO)}
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        env.pop(name, None)
    return {**env, **(extra or {})}


# ---------------------------------------------------------------- client-side counts


def client_counts(image_root) -> Counter:
    """This process's requests so far: the data directory's stores and the image root's (its forked workers'
    included), in the server's words."""
    from clip_assets.storage import object_store
    from clip_assets.storage.store_root import StoreRoot

    total = Counter(object_store.request_counts())
    if isinstance(image_root, StoreRoot):
        for name, n in image_root.requests.snapshot().items():
            total[name.upper()] += n
    return total


def requests_text(counts: Counter) -> str:
    text = " ".join(f"{k}={counts[k]}" for k in KINDS if counts.get(k))
    return text or "none"


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f}" if n else "0"


# ---------------------------------------------------------------- subprocess roles: a search, a classification


def _settings(args: dict):
    from clip_assets.config.settings import Settings

    return Settings(**{k: v for k, v in args["settings"].items()})


def search_role(args: dict) -> None:
    """A new process: the search three times (cold, warm at once, warm after the recheck window), each's
    seconds and client counts printed as a JSON line, each after a line on stdin (the server's counts are
    taken in between)."""
    started = time.perf_counter()
    from clip_assets.process import configure_process
    from clip_assets.search.query import search

    settings = _settings(args)
    configure_process(settings)
    imported = time.perf_counter() - started
    for name, pause in (("cold", 0.0), ("warm", 0.0), ("warm_after_recheck", settings.store_recheck_s + 0.5)):
        time.sleep(pause)
        before = client_counts(None)
        timings: dict[str, float] = {}
        t = time.perf_counter()
        hits = search(settings, text=QUERY, k=10, timings=timings)
        seconds = time.perf_counter() - t
        counts = client_counts(None)
        counts.subtract(before)
        print(json.dumps({"name": name, "seconds": seconds, "imports_s": imported, "hits": len(hits),
                          "timings": timings, "client": {k: v for k, v in counts.items() if v}}), flush=True)  # fmt: skip
        sys.stdin.readline()


def step_role(args: dict) -> None:
    """A new process with a fresh cache folder: one step of one batch, as a pod that never saw the data does it."""
    from clip_assets.classification.steps import write_classifications
    from clip_assets.config.layout import DataLayout
    from clip_assets.ingest.steps import write_manifest
    from clip_assets.process import configure_process
    from clip_assets.storage.store_root import image_root_from

    settings = _settings(args)
    configure_process(settings)
    image_root = image_root_from(settings.image_root)
    t = time.perf_counter()
    if args["step"] == "manifest":
        done = f"{write_manifest(image_root, DataLayout(settings.data_dir), args['batch']).files} files listed"
    else:
        done = f"{write_classifications(DataLayout(settings.data_dir), args['batch']).rows:,} rows"
    seconds = time.perf_counter() - t
    counts = client_counts(image_root)
    print(json.dumps({"seconds": seconds, "done": done, "client": {k: v for k, v in counts.items() if v}}),
          flush=True)  # fmt: skip


# ---------------------------------------------------------------- the run


class Bench:
    def __init__(self, args, work: Path, server: Server) -> None:
        self.args, self.work, self.server = args, work, server
        self.rows: list[dict] = []  # every measured step

    def measure(self, dataset: str, step: str, case, fn, image_root=None) -> tuple[dict, object]:
        """Run fn() once for a case, with the warehouse and cache the case says; its time and requests."""
        from clip_assets.storage.warehouse import configure_warehouse

        configure_warehouse(case["warehouse"])
        self.server.take()
        before = client_counts(image_root)
        t = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t
        client = client_counts(image_root)
        client.subtract(before)
        server = self.server.take()
        return self.record(dataset, step, case["name"], seconds, client, server), result

    def record(self, dataset, step, case, seconds, client: Counter, server: Counter, image_gets=0, note="",
               show_gets=False) -> dict:
        row = {"dataset": dataset, "step": step, "case": case, "seconds": seconds,
               "client": Counter({k: v for k, v in client.items() if v}),
               "server": Counter({k: v for k, v in server.items() if v and k in KINDS}),
               "bytes_out": server.get("bytes_out", 0), "bytes_in": server.get("bytes_in", 0),
               "image_gets": image_gets, "note": note}  # fmt: skip
        self.rows.append(row)
        mismatch = "" if row["client"] == row["server"] else f"   CLIENT COUNTED {requests_text(row['client'])}"
        print(f"  {dataset:<10} {step:<28} {case:<13} {seconds:8.2f} s   {requests_text(row['server']):<44} "
              f"down {megabytes(row['bytes_out']):>6} MB up {megabytes(row['bytes_in']):>6} MB{mismatch}"
              f"{'   ' + note if note else ''}", flush=True)  # fmt: skip
        if show_gets and server.get("gets"):
            print(f"{'':>16}GETs: " + ", ".join(f"{key.split('/', 1)[-1]} ({megabytes(n)} MB)"
                                                  for key, n in server["gets"]))  # fmt: skip
        return row

    def subprocess_search(self, dataset: str, case: dict, settings: dict) -> None:
        self.server.take()
        proc = subprocess.Popen([sys.executable, __file__, "--role", "search", "--args", json.dumps(
            {"settings": settings})], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=_env())  # fmt: skip
        launched = time.perf_counter()
        for _ in range(3):
            line = proc.stdout.readline()
            if not line.startswith("{"):
                proc.kill()
                raise RuntimeError(f"search in a new process failed: {line}{proc.stderr.read()[-3000:]}")
            result = json.loads(line)
            server = self.server.take()
            note = f"{result['hits']} hits; model load {result['timings'].get('model_load_s', 0):.2f} s, scan " \
                   f"{result['timings'].get('scan_s', 0):.2f} s"
            if result["name"] == "cold":
                note += f"; process launch to hits {time.perf_counter() - launched:.1f} s"
            self.record(dataset, f"search {result['name']}", case["name"], result["seconds"], Counter(result["client"]),
                        server, note=note, show_gets=True)  # fmt: skip
            proc.stdin.write("\n")
            proc.stdin.flush()
        proc.communicate(timeout=60)

    def subprocess_step(self, dataset: str, step: str, case: dict, settings: dict, batch: str) -> None:
        self.server.take()
        out = subprocess.run([sys.executable, __file__, "--role", "step", "--args", json.dumps(
            {"settings": settings, "batch": batch, "step": step})], capture_output=True, text=True, env=_env())  # fmt: skip
        server = self.server.take()
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"  {dataset:<10} {step + ', new machine':<28} {case['name']:<13} FAILED: {last[:200]}", flush=True)
            return
        result = json.loads(lines[-1])
        self.record(dataset, f"{step}, new machine", case["name"], result["seconds"], Counter(result["client"]),
                    server, note=f"{result['done']}; new process, fresh cache folder", show_gets=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=288, help="mixed JPEGs (the peer benchmark's corpus)")
    parser.add_argument("--synthetic", type=int, default=100_000, help="images of the synthetic-embeddings batch")
    parser.add_argument("--categories", type=int, default=10)
    parser.add_argument("--work", type=Path, help="folder for the data (default: a temp dir, removed after)")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.role == "server":
        serve()
        return
    if options.role:
        {"search": search_role, "step": step_role}[options.role](json.loads(options.args))
        return

    work = options.work or Path(tempfile.mkdtemp(prefix="clip-assets-store-vs-local-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {load_average()}; {os.cpu_count()} CPUs; nice {os.nice(0)}", flush=True)
    server = Server()
    os.environ.update(_env({"AWS_ENDPOINT_URL": server.endpoint}))
    try:
        run(options, work, server)
    finally:
        server.stop()
        print(f"load average at end:   {load_average()}")
        if options.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(options, work: Path, server: Server) -> None:
    import s3fs
    import torch
    from embed_throughput import make_images
    from million_batch import write_prompts

    from clip_assets.classification.steps import write_centroids, write_classifications
    from clip_assets.config.layout import DataLayout
    from clip_assets.config.settings import Settings
    from clip_assets.embedding.engine import decode_workers
    from clip_assets.embedding.options import EncodeOptions
    from clip_assets.embedding.steps import write_embeddings
    from clip_assets.ingest.steps import write_manifest
    from clip_assets.model.clip_model import load_clip_model
    from clip_assets.search import ann_index
    from clip_assets.search.query import search
    from clip_assets.storage import object_store
    from clip_assets.storage.store_root import StoreRoot
    from clip_assets_tests.support.models import TINY, save_random_checkpoint
    from clip_assets_tests.support.synthetic_embeddings import write_synthetic_batch

    server.take()
    names = make_images(CORPUS, options.images)
    local_images = work / "images"
    (local_images / BATCH).mkdir(parents=True, exist_ok=True)
    for name in names:
        target = local_images / BATCH / name
        if not target.exists():
            os.link(CORPUS / name, target) if _same_device(CORPUS, work) else shutil.copy2(CORPUS / name, target)
    fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True, use_listings_cache=False)
    fs.mkdir(BUCKET)
    fs.put([str(CORPUS / n) for n in names], [f"{BUCKET}/images/{BATCH}/{n}" for n in names])
    size = sum((CORPUS / n).stat().st_size for n in names)
    server.take()

    checkpoint = save_random_checkpoint(work / "tiny-seed0.pt", 0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    clip = load_clip_model(TINY, str(checkpoint), "cpu")
    prompts = work / "prompts"
    write_prompts(prompts, options.categories)
    object_store.configure_cache(work / "cache-this-process", recheck_s=object_store.DEFAULT_RECHECK_S)
    encode = EncodeOptions()  # the settings' defaults: decode workers min(16, cores), batch 64 on the CPU
    workers = decode_workers(encode.num_workers, options.images, encode.batch_size or 64)
    print(f"{len(names)} mixed JPEGs ({size / 1e6:.0f} MB, 640x480 up to 4000x3000), {TINY} (dim {clip.embed_dim}), "
          f"{options.categories} categories, {workers} decode workers; S3: moto on loopback ({server.endpoint}), "
          f"its own process\n", flush=True)  # fmt: skip

    def settings_for(case: dict, data_dir: str, cache: Path | None = None) -> dict:
        return {"image_root": case["image_root_setting"], "data_dir": data_dir, "prompts_dir": str(prompts),
                "model": TINY, "pretrained": str(checkpoint), "device": "cpu", "warehouse": case["warehouse"],
                "cache_dir": str(cache or work / "cache-this-process")}  # fmt: skip

    local = {"name": "local", "warehouse": "duckdb", "image_root": local_images,
             "image_root_setting": str(local_images)}  # fmt: skip
    store = {"name": "store", "warehouse": "parquet", "image_root": StoreRoot(f"s3://{BUCKET}/images"),
             "image_root_setting": f"s3://{BUCKET}/images"}  # fmt: skip
    store_duckdb = {**store, "name": "store+duckdb", "warehouse": "duckdb"}
    bench = Bench(options, work, server)
    fresh = iter(range(1, 100))

    print(f"{'':2} {'data':<10} {'step':<28} {'case':<13} {'time':>10}   {'requests (server count)':<44} bytes")
    # ------------------------------------------------ the 288 mixed JPEGs
    data = {"local": str(work / "local-288"), "store": f"s3://{BUCKET}/data-288"}
    data["store+duckdb"] = data["store"]
    layouts = {name: DataLayout(d) for name, d in data.items()}
    for case in (local, store):
        bench.measure("288 JPEGs", "manifest", case,
                      lambda c=case: write_manifest(c["image_root"], layouts[c["name"]], BATCH), case["image_root"])
    for case in (local, store):
        root = case["image_root"]
        before_root = root.requests.snapshot() if isinstance(root, StoreRoot) else {}
        row, summary = bench.measure("288 JPEGs", "embedding", case,
                                     lambda c=case: write_embeddings(clip, c["image_root"], layouts[c["name"]], BATCH,
                                                                     encode), root)  # fmt: skip
        if isinstance(root, StoreRoot):
            row["image_gets"] = {k.upper(): n for k, n in root.requests.since(before_root).items()}.get("GET", 0)
        row["note"] = f"{summary.encoded} encoded, {summary.encoded / row['seconds']:.1f} images/s"
        print(f"{'':>90}{row['note']}")
    for case in (local, store, store_duckdb):
        bench.measure("288 JPEGs", "centroids", case,
                      lambda c=case: write_centroids(clip, prompts, layouts[c["name"]]))
    for case in (local, store, store_duckdb):
        bench.measure("288 JPEGs", "classification", case,
                      lambda c=case: write_classifications(layouts[c["name"]], BATCH, image_root=c["image_root"]),
                      case["image_root"])  # fmt: skip
    for case in (local, store):
        bench.measure("288 JPEGs", "index shard", case, lambda c=case: ann_index.build_batch_shard(layouts[c["name"]],
                      BATCH))  # fmt: skip
    for case in (local, store):
        settings = settings_for(case, data[case["name"]])
        bench.measure("288 JPEGs", "search, first ever", case,
                      lambda s=settings: search(Settings(**s), text=QUERY, k=10))
    for case in (local, store):
        bench.subprocess_search("288 JPEGs", case, settings_for(case, data[case["name"]],
                                                               work / f"cache-new-{next(fresh)}"))  # fmt: skip

    # a re-scan of the batch on another machine, once a search has saved the text tower in the data directory
    bench.subprocess_step("288 JPEGs", "manifest", store, settings_for(store, data["store"],
                          work / f"cache-new-{next(fresh)}"), BATCH)  # fmt: skip

    # ------------------------------------------------ the synthetic batch
    label = f"{options.synthetic // 1000}k synth"
    data = {"local": str(work / "local-synthetic"), "store": f"s3://{BUCKET}/data-synthetic"}
    data["store+duckdb"] = data["store"]
    layouts = {name: DataLayout(d) for name, d in data.items()}
    for case in (local, store):
        bench.measure(label, "write synthetic (not a step)", case,
                      lambda c=case: write_synthetic_batch(layouts[c["name"]], SYNTHETIC, options.synthetic,
                                                           clip.embed_dim, clip.identity))  # fmt: skip
    for case in (local, store, store_duckdb):
        bench.measure(label, "centroids", case, lambda c=case: write_centroids(clip, prompts, layouts[c["name"]]))
    for case in (local, store, store_duckdb):  # no images behind the synthetic rows: no contact sheet
        bench.measure(label, "classification", case, lambda c=case: write_classifications(layouts[c["name"]], SYNTHETIC))
    for case in (store, store_duckdb):  # the DuckDB file is never published: a new machine has no centroids
        bench.subprocess_step(label, "classification", case, settings_for(case, data["store"],
                              work / f"cache-new-{next(fresh)}"), SYNTHETIC)  # fmt: skip
    for case in (local, store):
        bench.measure(label, "index shard", case, lambda c=case: ann_index.build_batch_shard(layouts[c["name"]],
                      SYNTHETIC))  # fmt: skip
    for case in (local, store):
        bench.measure(label, "search, first ever", case,
                      lambda s=settings_for(case, data[case["name"]]): search(Settings(**s), text=QUERY, k=10))
    for case in (local, store):
        bench.subprocess_search(label, case, settings_for(case, data[case["name"]], work / f"cache-new-{next(fresh)}"))

    print_ratios(bench.rows)
    print_latency_model(bench.rows, workers)


def _same_device(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def print_ratios(rows: list[dict]) -> None:
    print("\nstore / local, same step, same run (moto on loopback: no network latency, but moto's own CPU on the "
          "same cores):")  # fmt: skip
    by = {(r["dataset"], r["step"], r["case"]): r for r in rows}
    for (dataset, step, case), row in by.items():
        if case == "local" or (dataset, step, "local") not in by:
            continue
        base = by[(dataset, step, "local")]
        extra = ""
        if step == "embedding":
            rate = lambda r: float(r["note"].split(", ")[1].split()[0])  # noqa: E731
            extra = f"   ({rate(row):.1f} vs {rate(base):.1f} images/s)"
        print(f"  {dataset:<10} {step:<28} {case:<13} {row['seconds'] / max(base['seconds'], 1e-9):6.2f}x "
              f"({row['seconds']:.2f} s vs {base['seconds']:.2f} s){extra}")  # fmt: skip


def print_latency_model(rows: list[dict], workers: int) -> None:
    print("\nESTIMATE, not a measurement: what a real bucket's per-request latency would add to each store step, "
          "from the server's request counts alone.\n  sequential: every request one after another; with the "
          f"code's concurrency: the image GETs {CONCURRENT_GETS} at a time in each of {workers} decode workers "
          f"({CONCURRENT_GETS * workers} in flight), every other request one at a time (as the code sends them). "
          "Bandwidth left out (bytes above).")  # fmt: skip
    heads = [f"seq {ms}ms" for ms in LATENCIES_MS] + [f"conc {ms}ms" for ms in LATENCIES_MS]
    print(f"  {'data':<10} {'step':<28} {'case':<13} {'requests':>8} {'measured':>9} " + " ".join(f"{h:>10}" for h in heads))
    for row in rows:
        if row["case"] == "local":
            continue
        total = sum(row["server"].values())
        if not total:
            continue
        images = row["image_gets"]
        in_flight = CONCURRENT_GETS * max(1, workers)
        rounds = (total - images) + math.ceil(images / in_flight)
        added = [total * ms / 1000 for ms in LATENCIES_MS] + [rounds * ms / 1000 for ms in LATENCIES_MS]
        print(f"  {row['dataset']:<10} {row['step']:<28} {row['case']:<13} {total:>8} {row['seconds']:>8.2f}s "
              + " ".join(f"{'+' + format(a, '.2f') + 's':>10}" for a in added))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
