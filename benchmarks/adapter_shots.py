"""Few-shot adapters against calibration, category by category, away from the demo's held-out half.

    uv run python benchmarks/adapter_shots.py [--checkpoint PT] [--images 2000] [--draws 30] [--pool 191] [--shots 16]

Writes a second labelled collection of demo images (another seed, `--images` of them) under
`--dir`, embeds it with the demo model (default: the checkpoint `.demo/demo.env` names, so run
`clip-assets demo` first) and computes the centroids of `prompts/`. Then, per draw, takes a tuning
half of `--pool` images by hash (the demo's tuning half has 191), and from it the `--shots` sample
`clip-assets adapt --shots` learns from, and scores on every image outside the pool:

- calibrated: thresholds tuned on the whole pool (what `clip-assets calibrate` proposes);
- calibrated on the shots: thresholds tuned on the shot sample alone;
- adapted: the correction learnt from the shots, thresholds on the whole pool (`fit_on_tuning_half`);
- adapted, every label: the correction learnt from the whole pool.

Prints the mean F1 per category over the draws, and in how many draws some category fell more than
0.02 below calibrated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from clip_assets.tuning.adapter_evaluation import load_labelled_embeddings, scored
from clip_assets.tuning.adapters import f1_per_column, fit_adapters, select_shots
from clip_assets.tuning.calibration import stable_fraction
from clip_assets.tuning.calibration import predictions, tuned_settings
from clip_assets.tuning.labels_file import read_labels_file
from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import REPO_ROOT
from clip_assets.storage.warehouse import read_centroids
from clip_assets.embedding.options import EncodeOptions

SHORTFALL = 0.02


def demo_checkpoint() -> str:
    env = REPO_ROOT / ".demo" / "demo.env"
    if not env.is_file():
        raise SystemExit(f"{env} not found: run `uv run clip-assets demo` first, or pass --checkpoint")
    values = dict(line.split("=", 1) for line in env.read_text().splitlines() if "=" in line)
    return values["CLIP_ASSETS_PRETRAINED"]


def build_collection(root: Path, checkpoint: str, images: int) -> None:
    from clip_assets.classification.steps import write_centroids
    from clip_assets.embedding.steps import write_embeddings
    from clip_assets.ingest.steps import write_manifest
    from clip_assets.model.clip_model import load_clip_model
    from clip_assets.demo.shapes import write_collection
    from clip_assets.demo.train import DEMO_MODEL

    image_root = root / "images"
    if not image_root.exists():
        write_collection(image_root, batches=4, per_batch=images // 4, seed=4242)
    layout = DataLayout(root / "data")
    clip = load_clip_model(DEMO_MODEL, checkpoint)
    for batch in sorted(p.name for p in image_root.iterdir() if p.is_dir()):
        write_manifest(image_root, layout, batch)
        write_embeddings(clip, image_root, layout, batch, EncodeOptions(num_workers=1))
    write_centroids(clip, REPO_ROOT / "prompts", layout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the demo's checkpoint")
    parser.add_argument("--dir", type=Path, default=REPO_ROOT / ".demo" / "adapter_shots")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--draws", type=int, default=30)
    parser.add_argument("--pool", type=int, default=191)
    parser.add_argument("--shots", type=int, default=16)
    args = parser.parse_args()
    build_collection(args.dir, args.checkpoint or demo_checkpoint(), args.images)
    layout = DataLayout(args.dir / "data")
    centroids = read_centroids(layout.duckdb_path)
    data = load_labelled_embeddings(layout, read_labels_file(args.dir / "images" / "labels.csv"), centroids)
    zero_shot = scored(data, centroids)
    n = len(data.image_ids)
    results: dict[str, list[np.ndarray]] = {}
    for draw in range(args.draws):
        pool = np.array([stable_fraction(i, f"pool{draw}") for i in data.image_ids]) < args.pool / n
        rows, scored_on = np.flatnonzero(pool), ~pool
        ids = [data.image_ids[i] for i in rows]
        shots = select_shots(ids, data.truth[rows], args.shots)
        truth = data.truth[scored_on]
        runs = {
            "calibrated": predictions(zero_shot, *tuned_settings(zero_shot, pool)[:2]),
            "calibrated on the shots": predictions(zero_shot, *tuned_settings(zero_shot, rows[shots])[:2]),
        }
        for name, learn in (("adapted", shots), ("adapted, every label", None)):
            adapters = fit_adapters(ids, data.embeddings[rows], data.truth[rows], centroids, "bench", learn=learn)
            runs[name] = scored(data, centroids, adapters).matched
        for name, predicted in runs.items():
            results.setdefault(name, []).append(f1_per_column(predicted[scored_on], truth))
    print(f"{n} labelled demo images (seed 4242), {args.draws} draws of a {args.pool}-image tuning half and its "
          f"{args.shots}-shot sample, scored on the rest; mean F1 per category:")
    print(f"{'':26}" + "".join(f"{c[:8]:>9}" for c in centroids.categories) + "    macro  draws with a category "
          f"more than {SHORTFALL} below calibrated (worst)")
    reference = np.array(results["calibrated"])
    for name, per_draw in results.items():
        f = np.array(per_draw)
        worst = (f - reference).min(axis=1)
        print(f"{name:26}" + "".join(f"{v:9.3f}" for v in f.mean(0)) + f"{f.mean():9.4f}  "
              f"{int((worst < -SHORTFALL).sum()):>3} of {len(f)} ({worst.min():+.3f})")


if __name__ == "__main__":
    main()
