"""Embedding throughput: the engine against a naive loop, the model alone and decoding alone.

Generates photo-like JPEGs (smooth colour fields with noise, not flat colour) for each corpus:
`mixed` (640x480 up to 4000x3000) and `640x480`, then measures in one run, per model and corpus:

- naive: one process, PIL open, the model's preprocess, batched encode;
- model only: preprocessed tensors already on the device, batched encode (and with channels_last,
  and torch.compile with --compile), the ceiling for the engine; on the CPU also at each precision
  of CLIP_ASSETS_PRECISION (int8: Linear layers dynamically quantised; bfloat16 autocast);
- decode only, CPU workers: the Pillow path's workers decoding and preprocessing, no model;
- decode only, tensor path: workers read the bytes, JPEGs batch-decoded and preprocessed on the
  model's device (nvJPEG on CUDA), no model;
- engine, each path: clip_assets.embedding.engine.encode_images with decode="pillow" and decode="tensor",
  and the path decode="auto" picks; on the CPU also the Pillow path at the precision `auto` picks,
  and as it ran before the cores were shared out (as many decode workers as cores, and beside them
  as many torch threads);

and prints images/s with the CPU time per image (user + sys, decode workers included: on a shared
machine it says more than the wall time), the ratios and the GPU's name. Then (CPU) peak RSS of a whole `write_embeddings`
run for a batch and a 10x larger one, each in its own process. `--repeat` lists every file several
times, so that runs on a fast GPU last long enough to time (the files come from the page cache).

Weights are random (throughput does not depend on them), so nothing is downloaded.

    uv run python benchmarks/embed_throughput.py --model clip-assets-tiny --images 150
    uv run python benchmarks/embed_throughput.py --model ViT-B-32 --images 100
    # on a GPU machine (see benchmarks/gpu_benchmark.sh for the device tool):
    python benchmarks/embed_throughput.py --device cuda --models ViT-B-32 ViT-L-14 \\
        --corpora 640x480 mixed --images 1000 --repeat 20 --rss-images 0
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
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

from clip_assets.storage.arrow_vectors import vectors_matrix
from clip_assets.embedding import engine as embedding
from clip_assets.model.clip_model import (
    ClipModel,
    _input_size,
    batch_size_for,
    pick_device,
    register_model_configs,
    resolved_precision,
    tuned_for_inference,
)
from clip_assets.embedding.decode import draft_size
from clip_assets.embedding.engine import EncodeJob, default_num_workers, encode_images
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.image_files import ImageFiles, collate
from clip_assets.embedding.tensor_decode import (
    JpegBytesOrPixels,
    TensorDecoder,
    collate_bytes_or_pixels,
    decoded_batches,
    decoder_for,
)

SIZES = [(640, 480), (1024, 768), (1600, 1200), (2048, 1536), (4000, 3000)]
CORPORA = {"mixed": SIZES, "640x480": [(640, 480)]}
NAIVE_IMAGES = 256  # the naive loop and the model-only pixels take at most this many distinct files
MODEL_WARM_UP = 3  # batches the model-only figures encode before the clock starts


def photo_like(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    small = rng.integers(0, 255, (max(2, h // 60), max(2, w // 60), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
    noise = np.asarray(
        Image.fromarray(rng.integers(0, 40, (h // 2, w // 2, 3), dtype=np.uint8)).resize((w, h)), dtype=np.int16
    )
    return Image.fromarray(np.clip(base + noise - 20, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH_MORE)


def _write_image(args: tuple[Path, tuple[int, int], int]) -> None:
    path, size, seed = args
    if not path.exists():
        tmp = path.with_name(f".{path.name}.tmp")
        photo_like(*size, np.random.default_rng(seed)).save(tmp, "JPEG", quality=90)
        os.replace(tmp, path)


def make_images(folder: Path, n: int, seed: int = 0, sizes: list[tuple[int, int]] = SIZES) -> list[str]:
    """n JPEGs cycling through `sizes` (made once, in parallel, and reused from the folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(folder / f"img-{i:05d}.jpg", sizes[i % len(sizes)], seed * 1_000_003 + i) for i in range(n)]
    missing = [t for t in todo if not t[0].exists()]
    if len(missing) > 8:
        with multiprocessing.get_context("fork").Pool(max(1, os.cpu_count() or 1)) as pool:
            pool.map(_write_image, missing, chunksize=4)
    else:
        for t in missing:
            _write_image(t)
    return [t[0].name for t in todo]


def random_clip(name: str, device: str | None) -> ClipModel:
    register_model_configs()
    dev = pick_device(device)
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=dev)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    with torch.inference_mode():
        dim = int(model.encode_text(tokenizer(["x"]).to(dev)).shape[-1])
    return ClipModel(model, preprocess, tokenizer, f"{name}/random", dev, dim, 100.0, _input_size(model))


def synchronize(clip: ClipModel) -> None:
    if clip.device.type == "cuda":
        torch.cuda.synchronize(clip.device)


def naive(clip: ClipModel, folder: Path, names: list[str], batch_size: int) -> float:
    names = names[:NAIVE_IMAGES]
    start = time.perf_counter()
    for b in range(0, len(names), batch_size):
        pixels = [clip.preprocess(Image.open(folder / n).convert("RGB")) for n in names[b : b + batch_size]]
        clip.encode_image_tensors(torch.stack(pixels))
    return len(names) / (time.perf_counter() - start)


def model_only(clip: ClipModel, pixels: torch.Tensor, total: int, batch_size: int) -> float:
    """Encode `total` images in batches cut from `pixels` (already on the device), after a warm-up."""
    batch = pixels[:batch_size]
    if len(batch) < batch_size:
        batch = batch.repeat((batch_size + len(batch) - 1) // len(batch), 1, 1, 1)[:batch_size]
    for _ in range(MODEL_WARM_UP):
        clip.encode_image_tensors(batch)
    synchronize(clip)
    batches = max(1, total // batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        clip.encode_image_tensors(batch)
    synchronize(clip)
    return batches * batch_size / (time.perf_counter() - start)


def decode_only_workers(clip: ClipModel, folder: Path, paths: list[str], batch_size: int, workers: int) -> float:
    dataset = ImageFiles(folder, paths, [None] * len(paths), clip.preprocess, draft_size(clip), 60.0)
    start = time.perf_counter()
    for _ in DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        multiprocessing_context="fork" if workers else None):
        pass
    return len(paths) / (time.perf_counter() - start)


def decode_only_tensor(clip: ClipModel, folder: Path, paths: list[str], batch_size: int, workers: int) -> float:
    decoder = TensorDecoder(clip.device, clip.preprocess, draft_size(clip))
    dataset = JpegBytesOrPixels(folder, paths, [None] * len(paths), clip.preprocess, draft_size(clip), 60.0)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_bytes_or_pixels,
                        pin_memory=clip.device.type == "cuda", multiprocessing_context="fork" if workers else None)
    start = time.perf_counter()
    for _ in decoded_batches(loader, decoder, ahead=workers > 0):
        pass
    synchronize(clip)
    return len(paths) / (time.perf_counter() - start)


def engine(clip: ClipModel, folder: Path, paths: list[str], batch_size: int, workers: int, decode: str) -> float:
    job = EncodeJob(paths, paths, [None] * len(paths), [None] * len(paths), [None] * len(paths), {})
    start = time.perf_counter()
    result = encode_images(clip, folder, job, lambda table: None, EncodeOptions(batch_size=batch_size, num_workers=workers, decode=decode), report=lambda s: None)
    assert result.encoded == len(paths) and not result.failures, result.failures
    return len(paths) / (time.perf_counter() - start)


def equivalence(clip: ClipModel, folder: Path, names: list[str], workers: int) -> tuple[float, float]:
    """(lowest cosine between an image's tensor-path and Pillow-path embeddings, median between two images)."""
    vectors = {}
    for decode in ("pillow", "tensor"):
        tables = []
        job = EncodeJob(names, names, [None] * len(names), [None] * len(names), [None] * len(names), {})
        encode_images(clip, folder, job, tables.append, EncodeOptions(batch_size=32, num_workers=workers, decode=decode), report=lambda s: None)
        vectors[decode] = {i: v for t in tables for i, v in zip(t["image_id"].to_pylist(), vectors_matrix(t["embedding"]))}
    a = np.stack([vectors["pillow"][n] for n in names])
    b = np.stack([vectors["tensor"][n] for n in names])
    cross = (a @ a.T)[~np.eye(len(names), dtype=bool)]
    return float((a * b).sum(1).min()), float(np.median(cross))


PEAK_RSS_RUN = """
import json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from embed_throughput import random_clip
from clip_assets.embedding.steps import write_embeddings
from clip_assets.ingest.steps import write_manifest
from clip_assets.config.layout import DataLayout
from clip_assets.embedding.options import EncodeOptions
clip = random_clip(sys.argv[1], None)
layout = DataLayout(Path(sys.argv[3]))
write_manifest(Path(sys.argv[2]), layout, "batch")
summary = write_embeddings(clip, Path(sys.argv[2]), layout, "batch", EncodeOptions(batch_size=32), report=lambda s: None)
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


def device_name(clip: ClipModel) -> str:
    if clip.device.type == "cuda":
        return f"{torch.cuda.get_device_name(clip.device)} (torch {torch.__version__})"
    return f"cpu, {os.cpu_count()} cores, torch threads {torch.get_num_threads()} (torch {torch.__version__})"


def cpu_seconds() -> float:
    """User + sys CPU time of this process and of its finished children (the decode workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def with_cpu(images: int, run) -> tuple[float, float]:
    """(images/s as `run` returns it, CPU milliseconds per image while it ran)."""
    before = cpu_seconds()
    rate = run()
    return rate, 1000 * (cpu_seconds() - before) / images


def engine_as_before(clip: ClipModel, folder: Path, paths: list[str], batch_size: int) -> float:
    """The engine as it ran before the CPU's cores were shared out: a decode worker per core and,
    beside them, a torch thread per core."""
    cores = embedding.default_num_workers()
    shared_out = embedding.model_threads
    embedding.model_threads = lambda workers: cores
    try:
        return engine(clip, folder, paths, batch_size, cores, "pillow")
    finally:
        embedding.model_threads = shared_out


def measure(args, name: str, corpus: str, workers: int) -> None:
    folder = args.cache / f"jpegs-{corpus}"
    t = time.perf_counter()
    names = make_images(folder, args.images, sizes=CORPORA[corpus])
    paths = names * args.repeat
    clip = random_clip(name, args.device)
    batch_size = batch_size_for(clip, args.batch_size)
    on_cpu = clip.device.type == "cpu"
    engine_workers = embedding.decode_workers(args.workers, len(paths), batch_size)
    print(f"\n== {name} on {corpus} JPEGs: {len(names)} files x {args.repeat} = {len(paths)} images "
          f"(made in {time.perf_counter() - t:.1f} s); device {device_name(clip)}; batch {batch_size}, "
          f"{engine_workers} decode workers in the engine"
          + (f" beside {embedding.model_threads(engine_workers)} torch threads" if on_cpu else ""), flush=True)
    pixels = torch.stack([clip.preprocess(Image.open(folder / n).convert("RGB")) for n in names[:NAIVE_IMAGES]])
    pixels = pixels.to(clip.device)
    n_model = (MODEL_WARM_UP + max(1, len(paths) // batch_size)) * batch_size  # images model_only encodes
    rates = {
        "naive (1 process: PIL open, preprocess, encode)": with_cpu(min(len(names), NAIVE_IMAGES),
                                                                    lambda: naive(clip, folder, names, batch_size)),
        "model only (tensors on the device)": with_cpu(n_model, lambda: model_only(clip, pixels, len(paths), batch_size)),
    }
    tuned = tuned_for_inference(clip, channels_last=True)
    rates["model only, channels_last"] = with_cpu(n_model, lambda: model_only(tuned, pixels, len(paths), batch_size))
    clip.model.to(memory_format=torch.contiguous_format)
    fast = {}  # precision -> a model of its own (int8 quantises in place)
    if on_cpu:
        for precision in ("bfloat16", "int8"):
            fast[precision] = tuned_for_inference(random_clip(name, args.device), precision=precision)
            rates[f"model only, {precision}"] = with_cpu(
                n_model, lambda: model_only(fast[precision], pixels, len(paths), batch_size))
    if args.compile:
        compiled = tuned_for_inference(random_clip(name, args.device), compile_model=True)
        model_only(compiled, pixels, batch_size * 2, batch_size)  # compiles
        rates["model only, torch.compile"] = with_cpu(n_model,
                                                      lambda: model_only(compiled, pixels, len(paths), batch_size))
    rates["decode only, CPU workers (Pillow path)"] = with_cpu(
        len(paths), lambda: decode_only_workers(clip, folder, paths, batch_size, workers))
    rates[f"decode only, tensor path on {clip.device.type}"] = with_cpu(
        len(paths), lambda: decode_only_tensor(clip, folder, paths, batch_size, workers))
    if on_cpu:
        rates["engine, Pillow path, float32, as before (threads = cores)"] = with_cpu(
            len(paths), lambda: engine_as_before(clip, folder, paths, batch_size))
    rates["engine, Pillow path" + (", float32" if on_cpu else "")] = with_cpu(
        len(paths), lambda: engine(clip, folder, paths, batch_size, args.workers, "pillow"))
    rates[f"engine, tensor path on {clip.device.type}"] = with_cpu(
        len(paths), lambda: engine(clip, folder, paths, batch_size, args.workers, "tensor"))
    auto = resolved_precision("auto", clip.device)
    if auto in fast:
        rates[f"engine, Pillow path, {auto} (CLIP_ASSETS_PRECISION=auto)"] = with_cpu(
            len(paths), lambda: engine(fast[auto], folder, paths, batch_size, args.workers, "pillow"))
    chosen = []
    decoder_for("auto", clip, folder, paths, workers, chosen.append)
    for label, (rate, cpu_ms) in rates.items():
        print(f"  {label:<62} {rate:9.1f} images/s  {cpu_ms:7.1f} ms CPU/image", flush=True)
    rate = {label: r for label, (r, _) in rates.items()}
    best_model = max(v for k, v in rate.items() if k.startswith("model only"))
    best_engine = max(v for k, v in rate.items() if k.startswith("engine") and "as before" not in k)
    print(f"  auto picks: {chosen[-1] if chosen else 'pillow'}; precision {auto}")
    print(f"  best engine / naive       = {best_engine / rate['naive (1 process: PIL open, preprocess, encode)']:.2f}x")
    print(f"  best engine / model only  = {best_engine / best_model:.0%}")
    if on_cpu:
        before = rate["engine, Pillow path, float32, as before (threads = cores)"]
        print(f"  best engine / engine as before = {best_engine / before:.2f}x")
    same, cross = equivalence(clip, folder, names[:64], workers)
    print(f"  tensor vs Pillow path, same {min(64, len(names))} files: embeddings agree to cosine >= {same:.5f} "
          f"(two different images: median {cross:.4f})")
    pillow = next(k for k in rate if k.startswith("engine, Pillow path") and "as before" not in k)
    print(f"  tensor path / Pillow path = {rate[f'engine, tensor path on {clip.device.type}'] / rate[pillow]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="clip-assets-tiny")
    parser.add_argument("--models", nargs="*", default=None, help="several models (overrides --model)")
    parser.add_argument("--corpora", nargs="*", default=["mixed"], choices=sorted(CORPORA))
    parser.add_argument("--images", type=int, default=150, help="distinct files per corpus")
    parser.add_argument("--repeat", type=int, default=1, help="list every file this many times")
    parser.add_argument("--batch-size", type=int, default=32, help="0: from free GPU memory (64 on CPU)")
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on CPU)")
    parser.add_argument("--rss-images", type=int, default=200, help="small batch for the peak RSS figure (x10 too)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "clip-assets-bench")
    args = parser.parse_args()
    workers = default_num_workers() if args.workers < 0 else args.workers
    models = args.models or [args.model]
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name in models:
        for corpus in args.corpora:
            measure(args, name, corpus, workers)

    if args.rss_images:
        folder = args.cache / f"jpegs-{args.corpora[0]}"
        names = make_images(folder, args.images, sizes=CORPORA[args.corpora[0]])
        work = Path(tempfile.mkdtemp())
        small = peak_rss(models[0], args.cache / "rss", args.rss_images, [folder / n for n in names], work)
        large = peak_rss(models[0], args.cache / "rss", 10 * args.rss_images, [folder / n for n in names], work)
        for label, r in ((f"{args.rss_images} images", small), (f"{10 * args.rss_images} images", large)):
            print(f"peak RSS, write_embeddings of {label:>12}: main {r['self_mb']:7.0f} MB, "
                  f"largest worker {r['workers_mb']:6.0f} MB  ({r['rows']} rows)")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
