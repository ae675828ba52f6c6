"""Classification speed: the vectorised rule against the first seed's per-image Python loop.

Classifies N random unit embeddings (default 1,000,000 x 512) against 50 categories (multi_label,
with negatives and neutrals), in chunks, building the Arrow rows that go to DuckDB; times the
seed's loop on a sample of images; checks that both give the same matches on every sampled row;
prints images/s and the ratio, all measured in this one run.

    uv run python benchmarks/classify_throughput.py [--images 1000000] [--sample 5000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow.compute as pc

from clip_assets.classification.centroids import CentroidSet
from clip_assets.classification.rules import DEFAULT_CHUNK_IMAGES, centroid_columns, score_matrices
from clip_assets_tests.support.chunked_classification import classify_in_chunks


def unit(rng, *shape):
    x = rng.standard_normal(shape, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_centroids(rng, categories: int, dim: int) -> CentroidSet:
    has_neg = np.arange(categories) % 2 == 0
    return CentroidSet(
        categories=[f"category_{i:02d}" for i in range(categories)],
        sources=["bench.toml"] * categories,
        thresholds=rng.uniform(-0.05, 0.05, categories),
        neutral_margins=rng.uniform(0, 0.02, categories),
        positive=unit(rng, categories, dim),
        negative=unit(rng, categories, dim) * has_neg[:, None],
        neutral=np.repeat(unit(rng, 1, dim), categories, axis=0),
        has_negative=has_neg,
        has_neutral=np.ones(categories, dtype=bool),
        modes=["multi_label"] * categories,
        top_k=np.ones(categories, dtype=np.int64),
        logit_scale=100.0,
        prompt_counts={},
        prompt_hashes={},
        model="bench",
        prompt_version="bench",
    )


def seed_loop(image_embeddings, c: CentroidSet) -> list[list[tuple[str, float]]]:
    """The blog post's loop, as written there (one neutral embedding, dicts of centroids)."""
    neutral_embedding = c.neutral[0]
    category_embeddings = {
        name: (c.positive[i], c.negative[i]) for i, name in enumerate(c.categories)
    }
    category_thresholds = dict(zip(c.categories, c.thresholds))
    margins = dict(zip(c.categories, c.neutral_margins))
    results = []
    for img_emb in image_embeddings:
        img_categories: list[tuple[str, float]] = []
        neutral_sim = float(img_emb @ neutral_embedding)
        for title, (pos_emb, neg_emb) in category_embeddings.items():
            pos_sim = float(img_emb @ pos_emb)
            neg_sim = float(img_emb @ neg_emb)  # a zero vector where a category has no negatives
            score = pos_sim - neg_sim
            threshold = category_thresholds[title]
            if score >= threshold and pos_sim >= neutral_sim + margins[title]:
                img_categories.append((title, score))
        results.append(img_categories)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--categories", type=int, default=50)
    parser.add_argument("--sample", type=int, default=5_000, help="images the seed loop classifies")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    c = random_centroids(rng, args.categories, args.dim)
    embeddings = unit(rng, args.images, args.dim)
    ids = [f"{i:016x}" for i in range(args.images)]
    print(f"{args.images:,} embeddings x {args.dim} dims, {args.categories} categories")

    columns = centroid_columns(c)
    t = time.perf_counter()
    rule_matches = 0
    for start in range(0, args.images, DEFAULT_CHUNK_IMAGES):
        m = score_matrices(embeddings[start : start + DEFAULT_CHUNK_IMAGES], c, columns)
        rule_matches += int(m["matched"].sum())
    rule_s = time.perf_counter() - t
    rule_rate = args.images / rule_s
    print(f"vectorised rule (scores + matches):   {rule_s:8.2f} s  {rule_rate:12,.0f} images/s  ({rule_matches:,} matched)")

    t = time.perf_counter()
    rows = matches = 0
    for chunk in classify_in_chunks("bench", ids, embeddings, c):
        rows += chunk.num_rows
        matches += pc.sum(chunk["matched"]).as_py() or 0
    rows_s = time.perf_counter() - t
    rows_rate = args.images / rows_s
    print(f"vectorised rule + Arrow rows for DuckDB: {rows_s:5.2f} s  {rows_rate:12,.0f} images/s  ({rows:,} rows, {matches:,} matched)")

    sample = embeddings[: args.sample]
    t = time.perf_counter()
    loop = seed_loop(sample, c)
    loop_s = time.perf_counter() - t
    loop_rate = args.sample / loop_s
    print(f"seed loop on {args.sample:,} images:       {loop_s:8.2f} s  {loop_rate:12,.0f} images/s")

    vec = score_matrices(sample, c)
    same = all(
        [c.categories[j] for j in np.flatnonzero(vec["matched"][i])] == [name for name, _ in loop[i]]
        for i in range(args.sample)
    )
    scores_close = all(
        abs(vec["score"][i, c.categories.index(name)] - score) < 1e-5 for i in range(args.sample) for name, score in loop[i]
    )
    print(f"same matches on all {args.sample:,} sampled images: {same}; same scores (1e-5): {scores_close}")
    print(f"speed-up of the rule vs the seed loop (same output: scores and matches): {rule_rate / loop_rate:,.0f}x  (target >= 100x)")
    print(f"speed-up including the Arrow rows the loop does not build:              {rows_rate / loop_rate:,.0f}x")
    if not (same and scores_close):
        raise SystemExit("MISMATCH between the vectorised rule and the seed loop")


if __name__ == "__main__":
    main()
