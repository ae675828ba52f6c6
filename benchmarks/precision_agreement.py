"""Do int8 embeddings keep the decisions of float32 ones? On the demo's trained model and collection.

    python benchmarks/precision_agreement.py [--vit] [--checkpoint FILE] [--images DIR] [--threads 2]

Encodes the demo collection twice with the same trained checkpoint, once with the image tower in
float32 and once dynamically quantised to int8 (CLIP_ASSETS_PRECISION), classifies both with the
demo's prompt file (the rule the pipeline applies, from clip_assets.classification.rules), and prints:
the share of (image, category) decisions that agree, the images whose decisions differ, the cosine
between each image's two embeddings, the macro F1 of each against the ground truth, and the CPU
seconds each encoding took. Without --checkpoint the demo's model is trained (or reused from the
demo's cache, .demo/checkpoints) with the demo's recipe; without --images the demo collection
(seed 0) is generated under a temp folder.

The demo's model has a ResNet image tower, which int8 cannot quantise (dynamic quantisation reaches
Linear layers only). --vit trains its twin with the same text tower, recipe and data but a small
ViT image tower (VIT_TWIN below, registered from a temp folder), whose Linear layers int8 does reach.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

import numpy as np
import torch

from clip_assets.classification.centroids import compute_centroids
from clip_assets.classification.prompts import load_categories
from clip_assets.classification.rules import score_matrices
from clip_assets.demo.run import DEMO_DIR
from clip_assets.demo.shapes import LABELS_FILE, read_labels, write_collection
from clip_assets.demo.train import DEMO_MODEL, checkpoint_path, train_tiny_clip, training_recipe
from clip_assets.embedding.decode import draft_size, load_rgb
from clip_assets.model.clip_model import load_clip_model, with_precision
from clip_assets.tuning.evaluation import macro_f1, score_labels

REPO = Path(__file__).resolve().parents[1]
VIT_TWIN = "clip-assets-tiny-vit"  # the demo model's text tower and embedding size, a 2-block ViT image tower
VIT_TWIN_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "layers": 2, "width": 96, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 96, "heads": 3, "layers": 2},
}


def register_vit_twin() -> None:
    import open_clip

    folder = Path(tempfile.mkdtemp())
    (folder / f"{VIT_TWIN}.json").write_text(json.dumps(VIT_TWIN_CONFIG))
    open_clip.add_model_config(folder)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vit", action="store_true", help="the demo model's twin with a ViT image tower")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe, model = training_recipe(), DEMO_MODEL
    if args.vit:
        register_vit_twin()
        model = recipe["model"] = VIT_TWIN
    checkpoint = args.checkpoint or train_tiny_clip(checkpoint_path(DEMO_DIR / "checkpoints", recipe), recipe)
    images = args.images or Path(tempfile.mkdtemp()) / "demo-collection"
    if not (images / LABELS_FILE).is_file():
        write_collection(images)
    truth = read_labels(images / LABELS_FILE)
    paths = sorted(truth)
    categories = load_categories(REPO / "prompts")

    results = {}
    for precision in ("float32", "int8"):
        clip = with_precision(load_clip_model(model, str(checkpoint), device="cpu"), precision)
        pixels = torch.stack([clip.preprocess(load_rgb(images / p, draft_size(clip))) for p in paths])
        started = cpu_seconds()
        embeddings = np.concatenate([clip.encode_image_tensors(chunk).numpy() for chunk in pixels.split(64)])
        cpu = cpu_seconds() - started
        centroids = compute_centroids(categories, clip, "bench")  # the text tower stays float32 in both
        matched = score_matrices(embeddings, centroids)["matched"]
        names = centroids.categories
        predicted = {p: {names[j] for j in np.flatnonzero(matched[i])} for i, p in enumerate(paths)}
        results[precision] = (clip.precision, embeddings, matched, macro_f1(score_labels(predicted, truth, names)), cpu)

    (_, e32, m32, f32, cpu32), (resolved8, e8, m8, f8, cpu8) = results["float32"], results["int8"]
    cosines = np.sum(e32 * e8, axis=1)
    differing = np.flatnonzero((m32 != m8).any(axis=1))
    print(f"checkpoint {checkpoint}")
    print(f"{len(paths)} images x {m32.shape[1]} categories = {m32.size} decisions")
    print(f"int8 image tower as resolved: {resolved8}")
    print(
        f"decisions that agree: {np.mean(m32 == m8):.4f} ({int(np.sum(m32 != m8))} differ, in {len(differing)} images)"
    )
    print(f"cosine(float32, int8) per image: min {cosines.min():.4f}, median {np.median(cosines):.4f}")
    print(f"macro F1 against the ground truth: float32 {f32:.3f}, int8 {f8:.3f}")
    print(f"encoding CPU seconds (user+sys, {args.threads} threads): float32 {cpu32:.2f}, int8 {cpu8:.2f}")
    for i in differing[:10]:
        names = np.array(centroids.categories)
        print(f"  {paths[i]}: float32 {', '.join(names[m32[i]])}; int8 {', '.join(names[m8[i]])}")


if __name__ == "__main__":
    main()
