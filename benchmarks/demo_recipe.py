"""Train the demo's tiny model with a recipe and seed, then score it zero-shot on the demo collection.

    python benchmarks/demo_recipe.py --seeds 1 2 3 --threads 2 [--set epochs=14 --set lr=0.003]
        [--prompts prompts/demo_shapes.toml] [--checkpoints DIR] [--scores] [--checkpoint FILE]

Prints per seed the training wall and CPU seconds (user+sys of this process, all threads) and the
per-category precision, recall and F1 of the prompt file's rule, the same rule and figures the demo
reports (`clip-assets demo` goes through Dagster and DuckDB; this applies the classification
functions directly to the embeddings, which is the same arithmetic). The demo collection (seed 0) is
generated under the checkpoints folder; it is never trained on. A checkpoint already trained with the
same recipe is reused (its training time then is not shown), so prompt wording can be compared
without training again. --scores prints, per category, quantiles of the two margins the rule tests
(score - threshold and pos_sim - neutral_sim - margin) over the images that carry the label.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clip_assets.classification.centroids import compute_centroids
from clip_assets.classification.rules import score_matrices
from clip_assets.model.clip_model import load_clip_model
from clip_assets.demo.shapes import LABELS_FILE, read_labels, write_collection
from clip_assets.demo.train import DEMO_MODEL, checkpoint_path, train_tiny_clip, training_recipe
from clip_assets.embedding.decode import draft_size, load_rgb
from clip_assets.tuning.evaluation import macro_f1, score_labels
from clip_assets.classification.prompts import load_categories

REPO = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def embed_collection(checkpoint: Path, images: Path, truth: dict[str, set[str]]) -> tuple[object, list[str], np.ndarray]:
    clip = load_clip_model(DEMO_MODEL, str(checkpoint), device="cpu")
    paths = sorted(truth)
    size = draft_size(clip)
    pixels = torch.stack([clip.preprocess(load_rgb(images / p, size)) for p in paths])
    return clip, paths, clip.encode_image_tensors(pixels).numpy()


def evaluate(clip, paths: list[str], embeddings: np.ndarray, truth: dict[str, set[str]], prompts: Path, show_scores: bool):
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(prompts, Path(tmp) / prompts.name)
        categories = load_categories(Path(tmp))
    centroids = compute_centroids(categories, clip, "bench")
    m = score_matrices(embeddings, centroids)
    names = centroids.categories
    predicted = {p: {names[j] for j in np.flatnonzero(m["matched"][i])} for i, p in enumerate(paths)}
    scores = score_labels(predicted, truth, names)
    print(f"{'category':<10} {'precision':>9} {'recall':>7} {'F1':>6}")
    for s in scores:
        print(f"{s.category:<10} {s.precision:>9.3f} {s.recall:>7.3f} {s.f1:>6.3f}")
    f1 = macro_f1(scores)
    print(f"macro F1 {f1:.3f}, lowest category F1 {min(s.f1 for s in scores):.3f}")
    if show_scores:
        score_margin = m["score"] - m["thresholds"][None, :]
        neutral_margin = m["pos"] - m["neutral"] - m["neutral_margins"][None, :]
        q = (0.02, 0.1, 0.5)
        print(f"{'category':<10} {'label':>5}  score-threshold q{q}   pos-neutral-margin q{q}")
        for j, name in enumerate(names):
            for has in (True, False):
                rows = np.array([(name in truth[p]) == has for p in paths])
                s = np.quantile(score_margin[rows, j], q if has else [1 - x for x in q])
                n = np.quantile(neutral_margin[rows, j], q if has else [1 - x for x in q])
                print(f"{name:<10} {'yes' if has else 'no':>5}  {' '.join(f'{v:+.3f}' for v in s):<24} {' '.join(f'{v:+.3f}' for v in n)}")
    return f1, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    parser.add_argument("--prompts", type=Path, default=REPO / "prompts" / "demo_shapes.toml")
    parser.add_argument("--checkpoints", type=Path, default=Path(tempfile.gettempdir()) / "demo-recipe-bench")
    parser.add_argument("--scores", action="store_true")
    parser.add_argument("--checkpoint", type=Path, help="score this trained checkpoint instead of training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = dict(item.split("=", 1) for item in args.set)
    images = args.checkpoints / "demo-collection"
    if not (images / LABELS_FILE).is_file():
        write_collection(images)
    truth = read_labels(images / LABELS_FILE)
    if args.checkpoint:
        evaluate(*embed_collection(args.checkpoint, images, truth), truth, args.prompts, args.scores)
        return
    results = []
    for seed in args.seeds:
        recipe = training_recipe(seed=seed)
        recipe.update({k: parse_value(v) for k, v in overrides.items()})
        checkpoint = checkpoint_path(args.checkpoints, recipe)
        print(f"\n=== seed {seed}: {json.dumps(recipe, sort_keys=True)}")
        wall, cpu = time.monotonic(), cpu_seconds()
        trained = not checkpoint.is_file()
        train_tiny_clip(checkpoint, recipe, log=lambda line: print(line) if "epoch" not in line or line.startswith("epoch 1") else None)
        wall, cpu = time.monotonic() - wall, cpu_seconds() - cpu
        if trained:
            print(f"training: {wall:.0f} s wall, {cpu:.0f} s CPU (user+sys) with {args.threads} torch threads")
        clip, paths, embeddings = embed_collection(checkpoint, images, truth)
        f1, scores = evaluate(clip, paths, embeddings, truth, args.prompts, args.scores)
        results.append((seed, f1, min(s.f1 for s in scores), wall if trained else None, cpu if trained else None))
    print("\nseed  macroF1  minF1  wall_s  cpu_s")
    for seed, f1, low, wall, cpu in results:
        print(f"{seed:<5} {f1:>7.3f} {low:>6.3f} {wall or 0:>7.0f} {cpu or 0:>6.0f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
