"""Embedding throughput: the engine against a naive loop, the model alone and decoding alone.

Generates photo-like JPEGs of mixed sizes (640x480 up to 4000x3000, smooth colour fields with
noise, not flat colour), then measures in one run:

- naive: one process, PIL open, the model's preprocess, batched encode;
- model only: preprocessed tensors already in memory, batched encode;
- decode only: the engine's workers decoding and preprocessing, no model;
- engine: clip_assets.embedding.encode_images (workers, DCT-scaled decoding, overlap with the model);

and prints images/s and the ratios. Then peak RSS of a whole `write_embeddings` run (manifest,
parquet, chunked writes) for a batch and a 10x larger one, each in its own process.

Weights are random (throughput does not depend on them), so nothing is downloaded.

    uv run python benchmarks/embed_throughput.py --model clip-assets-tiny --images 150
    uv run python benchmarks/embed_throughput.py --model ViT-B-32 --images 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader

from clip_assets.clip_model import ClipModel, _input_size, pick_device, register_model_configs
from clip_assets.embedding import EncodeJob, _collate, _ImageFiles, default_num_workers, draft_size, encode_images

SIZES = [(640, 480), (1024, 768), (1600, 1200), (2048, 1536), (4000, 3000)]


def photo_like(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    small = rng.integers(0, 255, (max(2, h // 60), max(2, w // 60), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
    noise = np.asarray(
        Image.fromarray(rng.integers(0, 40, (h // 2, w // 2, 3), dtype=np.uint8)).resize((w, h)), dtype=np.int16
    )
    return Image.fromarray(np.clip(base + noise - 20, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH_MORE)


def make_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        name = f"img-{i:05d}.jpg"
        if not (folder / name).exists():
            photo_like(*SIZES[i % len(SIZES)], rng).save(folder / name, quality=90)
        names.append(name)
    return names


def random_clip(name: str, device: str | None) -> ClipModel:
    register_model_configs()
    dev = pick_device(device)
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=dev)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    with torch.inference_mode():
        dim = int(model.encode_text(tokenizer(["x"]).to(dev)).shape[-1])
    return ClipModel(model, preprocess, tokenizer, f"{name}/random", dev, dim, 100.0, _input_size(model))


def naive(clip: ClipModel, folder: Path, names: list[str], batch_size: int) -> float:
    start = time.perf_counter()
    for b in range(0, len(names), batch_size):
        pixels = [clip.preprocess(Image.open(folder / n).convert("RGB")) for n in names[b : b + batch_size]]
        clip.encode_image_tensors(torch.stack(pixels))
    return len(names) / (time.perf_counter() - start)


def model_only(clip: ClipModel, folder: Path, names: list[str], batch_size: int) -> float:
    pixels = torch.stack([clip.preprocess(Image.open(folder / n).convert("RGB")) for n in names])
    if clip.device.type == "cuda":
        pixels = pixels.pin_memory()
    clip.encode_image_tensors(pixels[:batch_size])  # warm-up
    start = time.perf_counter()
    for b in range(0, len(names), batch_size):
        clip.encode_image_tensors(pixels[b : b + batch_size])
    if clip.device.type == "cuda":
        torch.cuda.synchronize()
    return len(names) / (time.perf_counter() - start)


def decode_only(clip: ClipModel, folder: Path, names: list[str], batch_size: int, workers: int) -> float:
    dataset = _ImageFiles(folder, names, [None] * len(names), clip.preprocess, draft_size(clip), 60.0)
    start = time.perf_counter()
    for _ in DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate):
        pass
    return len(names) / (time.perf_counter() - start)


def engine(clip: ClipModel, folder: Path, names: list[str], batch_size: int, workers: int) -> float:
    job = EncodeJob(names, names, [None] * len(names), [None] * len(names), [None] * len(names), {})
    start = time.perf_counter()
    result = encode_images(clip, folder, job, lambda table: None, batch_size=batch_size, num_workers=workers,
                           report=lambda s: None)
    assert result.encoded == len(names) and not result.failures, result.failures
    return len(names) / (time.perf_counter() - start)


PEAK_RSS_RUN = """
import json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from embed_throughput import random_clip
from clip_assets import steps
from clip_assets.layout import DataLayout
clip = random_clip(sys.argv[1], None)
layout = DataLayout(Path(sys.argv[3]))
steps.write_manifest(Path(sys.argv[2]), layout, "batch")
summary = steps.write_embeddings(clip, Path(sys.argv[2]), layout, "batch", batch_size=32, report=lambda s: None)
print(json.dumps({"rows": summary.rows, "self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def peak_rss(model: str, root: Path, n: int, base: list[Path], work: Path) -> dict:
    """A batch of n files (hard links to the generated JPEGs, so disk stays small), one process."""
    batch = root / f"n{n}" / "batch"
    batch.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        link = batch / f"img-{i:06d}.jpg"
        if not link.exists():
            os.link(base[i % len(base)], link)
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_RUN, model, str(batch.parent), str(work / f"n{n}"), str(Path(__file__).parent)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="clip-assets-tiny")
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--rss-images", type=int, default=200, help="small batch for the peak RSS figure (x10 too)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "clip-assets-bench")
    args = parser.parse_args()
    workers = default_num_workers() if args.workers < 0 else args.workers
    folder = args.cache / "jpegs"
    t = time.perf_counter()
    names = make_images(folder, args.images)
    print(f"{len(names)} JPEGs, sizes {SIZES[0]}..{SIZES[-1]}, ready in {time.perf_counter() - t:.1f} s")
    clip = random_clip(args.model, args.device)
    print(f"model {args.model} on {clip.device}, batch {args.batch_size}, {workers} decode workers, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")

    rates = {
        "naive (1 process: PIL open, preprocess, encode)": naive(clip, folder, names, args.batch_size),
        "model only (tensors in memory)": model_only(clip, folder, names, args.batch_size),
        "decode only (engine workers, no model)": decode_only(clip, folder, names, args.batch_size, workers),
        "engine": engine(clip, folder, names, args.batch_size, workers),
    }
    for label, rate in rates.items():
        print(f"  {label:<50} {rate:9.1f} images/s")
    base = rates["naive (1 process: PIL open, preprocess, encode)"]
    print(f"engine / naive       = {rates['engine'] / base:.2f}x")
    print(f"engine / decode only = {rates['engine'] / rates['decode only (engine workers, no model)']:.0%}")
    print(f"engine / model only  = {rates['engine'] / rates['model only (tensors in memory)']:.0%}")

    if args.rss_images:
        work = Path(tempfile.mkdtemp())
        small = peak_rss(args.model, args.cache / "rss", args.rss_images, [folder / n for n in names], work)
        large = peak_rss(args.model, args.cache / "rss", 10 * args.rss_images, [folder / n for n in names], work)
        for label, r in ((f"{args.rss_images} images", small), (f"{10 * args.rss_images} images", large)):
            print(f"peak RSS, write_embeddings of {label:>12}: main {r['self_mb']:7.0f} MB, "
                  f"largest worker {r['workers_mb']:6.0f} MB  ({r['rows']} rows)")


if __name__ == "__main__":
    main()
