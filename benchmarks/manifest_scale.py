"""How long the manifest of a batch of 1,000,000 small files takes, beside the header probe it no longer does.

Creates N small image files (one tiny PNG's bytes, 1,000 per sub-folder) in a temporary folder, then
times, in this process: listing and stat-ing every file (`manifest.list_files`, what the re-scan
schedule does too), the manifest (`manifest.build_manifest`, stat alone since the embedding step
records files that are not images), the step that writes it (`write_manifest`), and for
comparison the manifest as it was built before: the same listing plus opening every file's header
with Pillow (`Image.open`, format and size). Prints wall and CPU seconds, files per second, and
the ratio of the step to the former manifest. Needs about 4 KB of disk and one inode per
file (4 GB for a million on a 4 KB-block file system): the free space is checked first.

    uv run python benchmarks/manifest_scale.py [--files 1000000] [--dir DIR (kept, reused)] [--skip-probe]
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from working_folder import working_folder  # noqa: E402

BATCH = "many"
PER_FOLDER = 1_000


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def create_files(root: Path, files: int) -> None:
    data = tiny_png()
    for start in range(0, files, PER_FOLDER):
        folder = root / BATCH / f"{start // PER_FOLDER:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, min(files, start + PER_FOLDER)):
            (folder / f"img-{i:08d}.png").write_bytes(data)


def listing_with_header_probe(root: Path, batch: str) -> int:
    """The former manifest's work: the listing, then each listed file's header opened with Pillow."""
    from clip_assets.ingest.manifest import STATUS_OK, list_files

    probed = 0
    for entry in list_files(root, batch):
        if entry.status == STATUS_OK:
            with Image.open(entry.path) as img:
                probed += bool(img.format and img.width)
    return probed


def timed(label: str, files: int, work):
    c, t = time.process_time(), time.perf_counter()
    result = work()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    print(f"  {label:<50} {wall:7.1f} s wall  {cpu:7.1f} s CPU  {files / wall:9,.0f} files/s")
    return result, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--skip-probe", action="store_true", help="do not time the former header probe")
    parser.add_argument("--dir", type=Path, help="where the files go (kept and reused); default a temp dir, removed")
    args = parser.parse_args()
    with working_folder(args.dir, "clip-assets-manifest-") as root:
        free = shutil.disk_usage(root).free
        if free < args.files * 8192:
            raise SystemExit(f"{free / 1e9:.1f} GB free under {root}: too little for {args.files:,} files")
        existing = sum(1 for _ in (root / BATCH).rglob("*.png")) if (root / BATCH).is_dir() else 0
        if existing != args.files:
            shutil.rmtree(root / BATCH, ignore_errors=True)
            t = time.perf_counter()
            create_files(root, args.files)
            print(f"created {args.files:,} files in {time.perf_counter() - t:.1f} s")
        from clip_assets.ingest.steps import write_manifest
        from clip_assets.config.layout import DataLayout
        from clip_assets.ingest.manifest import build_manifest, list_files

        print(f"manifest of one batch of {args.files:,} small files:")
        _, stat_wall = timed("list + stat (manifest.list_files)", args.files,
                             lambda: sum(1 for _ in list_files(root, BATCH)))
        table, build_wall = timed("manifest, stat only (manifest.build_manifest)", args.files,
                                  lambda: build_manifest(root, BATCH))
        summary, step_wall = timed("the step, parquet written (write_manifest)", args.files,
                                   lambda: write_manifest(root, DataLayout(root / "data"), BATCH))
        assert table.num_rows == summary.files == args.files and summary.usable == args.files
        if not args.skip_probe:
            probed, probe_wall = timed("before: list + stat + header probe (Image.open)", args.files,
                                       lambda: listing_with_header_probe(root, BATCH))
            assert probed == args.files
            print(f"  the step takes {step_wall / probe_wall:.2f}x the time of the former manifest's listing "
                  f"and probe ({probe_wall / step_wall:.1f}x faster)")


if __name__ == "__main__":
    main()
