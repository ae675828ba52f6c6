"""Few-shot adapters at scale, on the CPU: choose (cross-validation), fit and score with 100,000
labelled synthetic clustered embeddings of dimension 512.

    uv run python benchmarks/adapter_scale.py [--images 100000] [--categories 10] [--threads 1]

The images fall in clusters, one category each (multi_label file); each category's text centroid
points partly at another category's cluster, so zero-shot is poor and the adapters have something to
learn. Cross-validation runs on at most MAX_SELECTION_IMAGES of them, the cache keeps at most
MAX_CACHE_KEYS keys, and the chosen adapter is fitted on at most MAX_FIT_IMAGES. Prints wall and CPU seconds per phase.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--categories", type=int, default=10)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import numpy as np
    import torch

    from clip_assets.tuning import adapters as adapter_module
    from clip_assets.tuning.adapters import fit_adapters
    from clip_assets.classification.centroids import CentroidSet
    from clip_assets.classification.rules import score_matrices

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    c, d, n = args.categories, args.dim, args.images

    def unit(x):
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    centres = unit(rng.normal(size=(c, d)))
    text = unit(0.6 * centres + 0.8 * np.roll(centres, -1, axis=0))
    heldout = 20_000  # drawn alike, never learnt from: what the F1 line is measured on
    which = rng.integers(0, c, size=n + heldout)
    everything = unit(centres[which] + 1.2 * rng.normal(size=(n + heldout, d)) / np.sqrt(d) * 4)
    embeddings, unseen = everything[:n], everything[n:]
    truth, unseen_truth = np.eye(c, dtype=bool)[which[:n]], np.eye(c, dtype=bool)[which[n:]]
    ids = [f"img-{i:07d}" for i in range(n)]
    names = [f"c{i}" for i in range(c)]
    centroids = CentroidSet(
        categories=names, sources=["synthetic.toml"] * c, thresholds=np.zeros(c), neutral_margins=np.zeros(c),
        positive=text, negative=np.zeros((c, d), np.float32), neutral=np.zeros((c, d), np.float32),
        has_negative=np.zeros(c, bool), has_neutral=np.zeros(c, bool), modes=["multi_label"] * c,
        top_k=np.ones(c, dtype=np.int64), logit_scale=100.0, prompt_counts={}, prompt_hashes={},
        model="synthetic", prompt_version="v1",
    )

    def clock():
        t = os.times()
        return time.perf_counter(), t.user + t.system

    def f1(matched):
        t = unseen_truth
        tp = (matched & t).sum(0)
        return float(np.mean(2 * tp / np.maximum(2 * tp + (matched & ~t).sum(0) + (~matched & t).sum(0), 1)))

    print(f"{n:,} labelled images, dimension {d}, {c} categories, {args.threads} thread(s); "
          f"selection on at most {adapter_module.MAX_SELECTION_IMAGES:,} images, cache of at most "
          f"{adapter_module.MAX_CACHE_KEYS:,} keys, fit on at most {adapter_module.MAX_FIT_IMAGES:,}")
    w0, c0 = clock()
    zero_shot = score_matrices(embeddings, centroids)
    w1, c1 = clock()
    fitted = fit_adapters(ids, embeddings, truth, centroids, "bench")
    w2, c2 = clock()
    adapted = score_matrices(embeddings, centroids, adapters=fitted)
    w3, c3 = clock()
    f = fitted.files[0]
    print(f"chosen: {f.description}; cross-validated macro F1 per kind: {f.cv_macro_f1}")
    print(f"zero-shot scoring   wall {w1 - w0:7.2f} s  CPU {c1 - c0:7.2f} s")
    print(f"choose + fit        wall {w2 - w1:7.2f} s  CPU {c2 - c1:7.2f} s")
    print(f"adapted scoring     wall {w3 - w2:7.2f} s  CPU {c3 - c2:7.2f} s  ({(w3 - w2) / max(w1 - w0, 1e-9):.1f}x zero-shot)")
    print(f"macro F1 on {heldout:,} held-out images: zero-shot {f1(score_matrices(unseen, centroids)['matched']):.3f}, "
          f"adapted {f1(score_matrices(unseen, centroids, adapters=fitted)['matched']):.3f}")


if __name__ == "__main__":
    main()
