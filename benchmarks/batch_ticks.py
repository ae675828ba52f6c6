"""What a tick of the discovery sensor and of the re-scan schedule costs with many batches.

Builds an image root of `--batches` folders of `--files` small files each, a manifest per batch as
the manifest step leaves it (path, size, mtime of every file), and a real Dagster instance (sqlite,
in a temp dir) with every batch registered as an `image_batches` partition. Then evaluates, in this
process, the project's own sensor and schedule functions with Dagster's contexts:

- discovery, nothing new: one `stat` of the image root;
- discovery, one new folder among them: the root is listed and compared with the partitions;
- re-scan, nothing changed: every batch's files are stat-ed and compared with its manifest;
- re-scan, a few batches changed.

Dagster's daemon calls the same functions over gRPC and gives a tick 60 s by default
(DAGSTER_SENSOR_GRPC_TIMEOUT_SECONDS / DAGSTER_SCHEDULE_GRPC_TIMEOUT_SECONDS): a tick must stay well
under that. Timed on whatever else the machine is doing: the load average is printed.

    uv run python benchmarks/batch_ticks.py --batches 10000 --files 20
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import dagster as dg

    from clip_assets.defs.partitions import image_batches
    from clip_assets.defs.resources import ImageCollection
    from clip_assets.defs.ingest.schedules import build_rescan_schedule
    from clip_assets.defs.ingest.sensors import image_batch_discovery
    from clip_assets.config.layout import DataLayout
    from clip_assets.config.settings import Settings
    from clip_assets.ingest.manifest import list_files


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


def make_collection(root: Path, layout: DataLayout, batches: list[str], files: int) -> None:
    for batch in batches:
        folder = root / batch
        folder.mkdir(parents=True)
        for n in range(files):
            (folder / f"img-{n:05d}.jpg").write_bytes(b"x")
        listed = list(list_files(root, batch))
        layout.manifest_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"path": [f.relative_path for f in listed], "size": [f.size for f in listed],
                                 "mtime": [f.mtime for f in listed]}), layout.manifest_path(batch))


def timed(what: str, call):
    started, cpu = time.perf_counter(), time.process_time()
    result = call()
    print(f"  {what:<52} {time.perf_counter() - started:7.2f} s wall {time.process_time() - cpu:7.2f} s CPU",
          flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=20, help="files per batch")
    parser.add_argument("--changed", type=int, default=5, help="batches changed before the second re-scan")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, dg.instance_for_test(temp_dir=tmp) as instance:
        root, layout = Path(tmp) / "images", DataLayout(Path(tmp) / "data")
        batches = [f"batch-{n:06d}" for n in range(args.batches)]
        started = time.perf_counter()
        make_collection(root, layout, batches, args.files)
        instance.add_dynamic_partitions(image_batches.name, batches)
        print(f"{args.batches:,} batches x {args.files} files, manifests and partitions ready in "
              f"{time.perf_counter() - started:.0f} s; load average {load()}")
        collection = ImageCollection.from_settings(Settings(
            image_root=root, prompts_dir=Path(tmp) / "prompts", data_dir=layout.data_dir))

        def discovery(cursor: str | None):
            context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"collection": collection})
            return image_batch_discovery(context)

        first = timed("discovery, first tick (lists the root)", lambda: discovery(None))
        cursor = first.cursor
        timed("discovery, nothing new", lambda: discovery(cursor))
        (root / "batch-new").mkdir()
        (root / "batch-new" / "img.jpg").write_bytes(b"x")
        found = timed("discovery, one new folder", lambda: discovery(cursor))
        print(f"    -> {len(found.dynamic_partitions_requests)} partition request(s), "
              f"{len(found.run_requests)} run request(s)")

        schedule = build_rescan_schedule("0 * * * *")

        def rescan():
            context = dg.build_schedule_context(instance=instance, resources={"collection": collection})
            return schedule.evaluate_tick(context)

        result = timed(f"re-scan, nothing changed ({args.batches:,} batches)", rescan)
        print(f"    -> {len(result.run_requests or [])} run requests; {result.skip_message or ''}")
        for batch in batches[:: max(1, len(batches) // args.changed)][: args.changed]:
            (root / batch / "img-new.jpg").write_bytes(b"xy")
        result = timed(f"re-scan, {args.changed} batches changed", rescan)
        print(f"    -> {len(result.run_requests or [])} run requests")
        print(f"load average at the end {load()}")


if __name__ == "__main__":
    sys.exit(main())
