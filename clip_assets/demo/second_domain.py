"""The demo's second domain: the same shapes and colours, hatched (or drawn as outlines), with captions.

The demo's tiny model was trained on filled shapes (clip_assets.demo.train) and never saw hatched
fills or outlines: on hatched shapes it scores macro F1 0.64 (circles near 0), against 0.98 on
filled shapes (today's recipe, a quiet machine). This module writes a captioned collection of such images, fine-tunes the demo
model on it (clip_assets.tuning.fine_tuning) and scores zero-shot classification, with the project's prompt
files and classification rule, of the base and the fine-tuned model on the images the fine-tuning
held out (calibration's path-hash split: no held-out image or caption is ever trained on), and on
the demo's own filled-shape collection (what the tuning costs there). `--wise-sweep` scores a tuned
checkpoint's weights mixed with the base ones in several proportions (WiSE-FT), without training.
`--replay N` mixes captioned pairs of N new filled-shape images (the domain the model knows, drawn
apart from the demo collection it is scored on) into the captions it tunes on: replay, the other
usual remedy for forgetting.

    python -m clip_assets.demo.second_domain [--outline] [--lock-image] [--wise-alpha A] [--replay N] [--threads N]
    python -m clip_assets.demo.second_domain --wise-sweep TUNED_CHECKPOINT [--alphas 0.3,0.5,0.7,1]
"""

from __future__ import annotations

import csv
import dataclasses
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from clip_assets.classification.centroids import compute_centroids
from clip_assets.classification.prompts import load_categories, prompt_version
from clip_assets.classification.rules import score_matrices
from clip_assets.cli import share_or_auto
from clip_assets.config import accepted_warnings
from clip_assets.demo.captions import training_caption
from clip_assets.demo.run import DEMO_DIR, demo_settings
from clip_assets.demo.shapes import (
    BACKGROUNDS,
    COLOURS,
    LABELS_FILE,
    SHAPES,
    Sample,
    ShapeSpec,
    _background,
    _draw_shape,
    make_sample,
    read_labels,
)
from clip_assets.demo.train import checkpoint_path, training_recipe
from clip_assets.embedding.decode import load_rgb
from clip_assets.model.clip_model import ClipModel, load_clip_model
from clip_assets.tuning.calibration import category_scores, is_heldout
from clip_assets.tuning.evaluation import CategoryScore, macro_f1
from clip_assets.tuning.fine_tuning import (
    FineTuneOptions,
    FineTuneReport,
    fine_tune_to_checkpoint,
    interpolate_weights,
    opt_in_note,
)

CAPTIONS_FILE = "captions.csv"
IMAGES_FOLDER = "images"
CAPTIONS_PER_IMAGE = 3
# Measured on the hatched domain (`python -m clip_assets.demo.second_domain`, docs/fine-tuning.md): both towers, 15 epochs at 2e-3 (the tiny
# model's from-scratch rate) in batches of 32, the WiSE-FT share chosen on validation images (1 on
# a quiet machine's demo model), lift held-out macro F1 by 0.217 and cost filled shapes 0.212 (with
# 360 filled images replayed: +0.227 and -0.129). 10 epochs at 1e-3 in batches of 64
# gave +0.18-0.20 on an earlier demo model; the text side alone (LiT) lowered both.
DEMO_OPTIONS = FineTuneOptions(epochs=15, lr=2e-3, batch_size=32)


def _stroke(filled: Image.Image, rng: random.Random, style: str) -> Image.Image:
    """Which pixels of a filled shape's mask get its colour: its rim (outline) or diagonal hatching."""
    if style == "outline":
        inside = filled.filter(ImageFilter.MinFilter(rng.choice([5, 7])))
        return Image.composite(Image.eval(inside, lambda v: 255 - v), filled, filled)
    step, phase = rng.randint(3, 5), rng.randint(0, 9)
    hatch = Image.new("L", filled.size, 0)
    draw = ImageDraw.Draw(hatch)
    w, h = filled.size
    for x in range(-h + phase, w, 2 * step):
        draw.polygon([(x, 0), (x + step, 0), (x + step + h, h), (x + h, h)], fill=255)
    return Image.composite(hatch, filled, filled)


def make_drawn_sample(rng: random.Random, size: tuple[int, int] = (96, 96), style: str = "hatched") -> Sample:
    """One or two shapes of distinct kinds and colours, hatched or outlined in their colour, on a background."""
    n = 1 if rng.random() < 0.5 else 2
    specs = tuple(ShapeSpec(k, c) for k, c in zip(rng.sample(SHAPES, n), rng.sample(list(COLOURS), n)))
    background = rng.choice(BACKGROUNDS)
    img = _background(rng, background, size)
    w, h = size
    side = min(w, h)
    centres = [(0.5, 0.5)] if n == 1 else rng.choice([[(0.28, 0.5), (0.72, 0.5)], [(0.5, 0.28), (0.5, 0.72)]])
    for spec, (fx, fy) in zip(specs, centres):
        r = side * (rng.uniform(0.2, 0.3) if n == 1 else rng.uniform(0.14, 0.19))
        cx, cy = (w - side) / 2 + fx * side, (h - side) / 2 + fy * side
        shape = Image.new("RGB", size, (0, 0, 0))
        _draw_shape(ImageDraw.Draw(shape), spec, (int(cx - r), int(cy - r), int(cx + r), int(cy + r)), rng)
        filled = shape.convert("L").point(lambda v: 255 if v else 0)
        img.paste(COLOURS[spec.colour], mask=_stroke(filled, rng, style))
    return Sample(image=img, shapes=specs, background=background)


def write_domain_collection(root: Path, style: str = "hatched", images: int = 720, seed: int = 99) -> Path:
    """Images under root/images, a captions file (path, caption; several per image) and labels.csv."""
    rng = random.Random(seed)
    folder = root / IMAGES_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    captions, labels = [], []
    for i in range(images):
        sample = make_drawn_sample(rng, rng.choice([(96, 96), (128, 96), (96, 128)]), style)
        path = f"{IMAGES_FOLDER}/{style}-{i:04d}.png"
        sample.image.save(root / path)
        captions += [(path, training_caption(sample, rng).text) for _ in range(CAPTIONS_PER_IMAGE)]
        labels.append((path, sample.caption(), ";".join(sample.labels)))
    _write_csv(root / CAPTIONS_FILE, ["path", "caption"], captions)
    _write_csv(root / LABELS_FILE, ["path", "caption", "labels"], labels)
    return root / CAPTIONS_FILE


REPLAY_FOLDER = "replay"


def write_replay_captions(root: Path, images: int, seed: int = 7) -> Path:
    """The domain's captions file plus captioned pairs of `images` new filled-shape images (under
    root/replay, drawn as the demo model's training images are; another seed than the demo
    collection's, so none of the images forgetting is scored on is trained on). Returns its path."""
    rng = random.Random(seed)
    folder = root / REPLAY_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    with open(root / CAPTIONS_FILE, newline="") as f:
        captions = [(row["path"], row["caption"]) for row in csv.DictReader(f)]
    for i in range(images):
        sample = make_sample(rng, rng.choice([(96, 96), (128, 96), (96, 128)]))
        path = f"{REPLAY_FOLDER}/filled-{i:04d}.png"
        if not (root / path).is_file():
            sample.image.save(root / path)
        # Worded as the demo model's own training captions were (background tints named).
        captions += [(path, training_caption(sample, rng, tints=True).text) for _ in range(CAPTIONS_PER_IMAGE)]
    out = root / f"captions-replay-{images}.csv"
    _write_csv(out, ["path", "caption"], captions)
    return out


def _write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def zero_shot_scores(clip: ClipModel, prompts_dir: Path, image_root: Path, truth: dict[str, set[str]],
                     batch_size: int = 64) -> list[CategoryScore]:
    """Per-category precision/recall/F1 of the prompt files' classification rule, as the pipeline applies it."""
    centroids = compute_centroids(load_categories(prompts_dir), clip, prompt_version(prompts_dir))
    paths = sorted(truth)
    embeddings = torch.cat([
        clip.encode_image_tensors(torch.stack([clip.preprocess(load_rgb(image_root / p)) for p in paths[i:i + batch_size]]))
        for i in range(0, len(paths), batch_size)
    ]).numpy()
    matched = score_matrices(embeddings, centroids)["matched"]
    wanted = np.array([[c in truth[p] for c in centroids.categories] for p in paths], dtype=bool)
    return category_scores(matched, wanted, centroids.categories)


@dataclass(frozen=True)
class DomainComparison:
    domains: dict[str, tuple[int, list[CategoryScore], list[CategoryScore]]]  # name: (images, base, tuned)

    def table(self) -> str:
        lines = []
        for name, (images, base, tuned) in self.domains.items():
            lines += [f"\n{name} ({images} images): zero-shot F1 per category",
                      f"{'category':<10} {'base':>7} {'tuned':>7}"]
            lines += [f"{b.category:<10} {b.f1:>7.3f} {t.f1:>7.3f}" for b, t in zip(base, tuned)]
            lines.append(f"{'macro F1':<10} {macro_f1(base):>7.3f} {macro_f1(tuned):>7.3f}  "
                         f"({macro_f1(tuned) - macro_f1(base):+.3f})")
        return "\n".join(lines)


def heldout_truth(labels_file: Path, heldout_fraction: float) -> dict[str, set[str]]:
    """The labelled images the fine-tuning's path-hash split held out."""
    return {p: l for p, l in read_labels(labels_file).items() if is_heldout(p, heldout_fraction)}


def compare_on_domains(base: ClipModel, tuned: ClipModel, prompts_dir: Path,
                       domains: dict[str, tuple[Path, dict[str, set[str]]]]) -> DomainComparison:
    """Zero-shot scores of both models on each domain's (image root, labels)."""
    return DomainComparison({
        name: (len(truth), zero_shot_scores(base, prompts_dir, root, truth), zero_shot_scores(tuned, prompts_dir, root, truth))
        for name, (root, truth) in domains.items()
    })


def _demo_domains(demo_dir: Path, style: str, heldout_fraction: float, log=print):
    """(settings, the domain's root, {name: (image root, labels)}): the held-out images of the domain
    (its collection written once) and the demo's own filled-shape collection."""
    base_checkpoint = checkpoint_path(demo_dir / "checkpoints", training_recipe())
    if not base_checkpoint.is_file():
        raise FileNotFoundError(f"No demo model at {base_checkpoint}: run `clip-assets demo` first.")
    settings = demo_settings(demo_dir, base_checkpoint)
    root = demo_dir / f"{style}-shapes"
    if not (root / CAPTIONS_FILE).is_file():
        write_domain_collection(root, style)
        log(f"generated the {style} collection under {root}")
    return settings, root, {
        f"{style} shapes, held out from fine-tuning": (root, heldout_truth(root / LABELS_FILE, heldout_fraction)),
        "filled shapes, the demo collection": (settings.image_root, read_labels(settings.image_root / LABELS_FILE)),
    }


def run_second_domain(demo_dir: Path, options: FineTuneOptions, style: str = "hatched", replay: int = 0,
                      log=print) -> tuple[FineTuneReport, DomainComparison]:
    """Write the domain's collection (once), fine-tune the demo's model on it (with `replay` filled-shape
    images' pairs mixed in), compare on held-out images."""
    settings, root, domains = _demo_domains(demo_dir, style, options.heldout_fraction, log)
    captions = write_replay_captions(root, replay) if replay else root / CAPTIONS_FILE
    if replay:
        log(f"replay: {replay} filled-shape images' pairs mixed into the {style} captions ({captions.name})")
    report = fine_tune_to_checkpoint(settings.model, settings.pretrained, captions, root,
                                     settings.data_dir, options, "cpu", log)
    log(report.table())
    base = load_clip_model(settings.model, settings.pretrained, "cpu")
    tuned = load_clip_model(settings.model, str(report.checkpoint), "cpu")
    comparison = compare_on_domains(base, tuned, settings.prompts_dir, domains)
    log(comparison.table())
    log("\n" + opt_in_note(report, settings.model))
    return report, comparison


def wise_sweep(demo_dir: Path, tuned_checkpoint: Path, alphas: list[float], style: str = "hatched",
               log=print) -> dict[float, dict[str, float]]:
    """Macro F1 on both domains of the weights alpha * tuned + (1 - alpha) * base (WiSE-FT) of a checkpoint
    fine-tuned on the domain with the default held-out split, for each alpha (1: the tuned model)."""
    settings, _, domains = _demo_domains(demo_dir, style, DEMO_OPTIONS.heldout_fraction, log)
    base = load_clip_model(settings.model, settings.pretrained, "cpu")
    tuned = load_clip_model(settings.model, str(tuned_checkpoint), "cpu")
    tuned_state = {k: v.clone() for k, v in tuned.model.state_dict().items()}
    short = {name: name.split(",")[0] for name in domains}
    log(f"macro F1 of alpha * tuned + (1 - alpha) * base weights ({tuned_checkpoint.name})")
    log(f"{'alpha':<8}" + "".join(f"{short[n]:>16}" for n in domains))
    figures = {0.0: {n: macro_f1(zero_shot_scores(base, settings.prompts_dir, r, t)) for n, (r, t) in domains.items()}}
    for alpha in alphas:
        tuned.model.load_state_dict(tuned_state)
        interpolate_weights(tuned.model, base.model.state_dict(), alpha)
        figures[alpha] = {n: macro_f1(zero_shot_scores(tuned, settings.prompts_dir, r, t)) for n, (r, t) in domains.items()}
    for alpha, scores in figures.items():
        log(f"{alpha:<8g}" + "".join(f"{scores[n]:>16.3f}" for n in domains) + ("  (base)" if alpha == 0 else ""))
    return figures


def _option(name: str, default: str | None = None) -> str | None:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


if __name__ == "__main__":
    accepted_warnings.ignore()
    torch.set_num_threads(int(_option("--threads", str(torch.get_num_threads()))))
    style = "outline" if "--outline" in sys.argv else "hatched"
    if "--wise-sweep" in sys.argv:
        wise_sweep(DEMO_DIR, Path(_option("--wise-sweep")), [float(a) for a in _option("--alphas", "0.3,0.5,0.7,1").split(",")],
                   style)
    else:
        run_second_domain(DEMO_DIR, dataclasses.replace(DEMO_OPTIONS, lock_image="--lock-image" in sys.argv,
                                                        wise_alpha=share_or_auto(_option("--wise-alpha", "auto"))), style,
                          replay=int(_option("--replay", "0")))
