"""A synthetic image collection with captions and ground truth: coloured shapes on varied backgrounds.

Each image holds one or two shapes of different kinds and colours. Its labels are the shape kinds
and the colours present, so an image is multi-label, like the first seed's categories.
"""

from __future__ import annotations

import colorsys
import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
}
BACKGROUNDS = ("plain", "noise", "gradient", "stripes")
# Hue ranges (degrees) in which a pale background is called by a colour name (captions may say it).
TINT_HUES = {"pink": ((0, 15), (340, 360)), "yellow": ((42, 68),), "green": ((90, 160),), "blue": ((200, 250),)}


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    shapes: tuple[ShapeSpec, ...]
    background: str
    background_tint: str | None = None  # a colour name when the background is clearly tinted with it

    @property
    def labels(self) -> list[str]:
        return sorted({s.shape for s in self.shapes} | {s.colour for s in self.shapes})

    def caption(self) -> str:
        return f"{' and '.join(f'a {s.colour} {s.shape}' for s in self.shapes)} on a {self.background} background"


def _background(rng: random.Random, kind: str, size: tuple[int, int]) -> Image.Image:
    w, h = size
    base = tuple(rng.randint(150, 245) for _ in range(3))
    img = Image.new("RGB", size, base)
    draw = ImageDraw.Draw(img)
    if kind == "noise":
        img = Image.effect_noise(size, rng.randint(20, 45)).convert("RGB")
        img = Image.blend(img, Image.new("RGB", size, base), 0.5)
    elif kind == "gradient":
        other = tuple(rng.randint(90, 200) for _ in range(3))
        for y in range(h):
            t = y / max(1, h - 1)
            draw.line([(0, y), (w, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(base, other)))
    elif kind == "stripes":
        other = tuple(max(0, c - rng.randint(30, 60)) for c in base)
        step = rng.randint(6, 12)
        for x in range(-h, w, step * 2):
            draw.polygon([(x, 0), (x + step, 0), (x + step + h, h), (x + h, h)], fill=other)
    return img


def background_tint(img: Image.Image) -> str | None:
    """The colour name a person would give the background's mean colour, if it is clearly tinted."""
    pixels = list(img.convert("RGB").resize((8, 8)).get_flattened_data())
    r, g, b = (sum(p[i] for p in pixels) / len(pixels) / 255 for i in range(3))
    hue, saturation, _ = colorsys.rgb_to_hsv(r, g, b)
    if saturation < 0.15:
        return None
    degrees = hue * 360
    return next((name for name, ranges in TINT_HUES.items() if any(lo <= degrees < hi for lo, hi in ranges)), None)


def _draw_shape(draw: ImageDraw.ImageDraw, spec: ShapeSpec, box: tuple[int, int, int, int], rng: random.Random):
    colour = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[spec.colour])
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if spec.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif spec.shape == "square":
        a = rng.uniform(0, math.pi / 2)
        pts = [(cx + r * 0.9 * math.cos(a + k * math.pi / 2), cy + r * 0.9 * math.sin(a + k * math.pi / 2)) for k in range(4)]
        draw.polygon(pts, fill=colour)
    elif spec.shape == "triangle":
        a = rng.uniform(0, 2 * math.pi)
        pts = [(cx + r * math.cos(a + k * 2 * math.pi / 3), cy + r * math.sin(a + k * 2 * math.pi / 3)) for k in range(3)]
        draw.polygon(pts, fill=colour)
    elif spec.shape == "star":
        a = rng.uniform(0, 2 * math.pi)
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            pts.append((cx + rad * math.cos(a + k * math.pi / 5), cy + rad * math.sin(a + k * math.pi / 5)))
        draw.polygon(pts, fill=colour)


def make_sample(rng: random.Random, size: tuple[int, int] = (96, 96)) -> Sample:
    """One image with one or two shapes of distinct kinds and colours, kept inside the centre square."""
    n = 1 if rng.random() < 0.5 else 2
    kinds = rng.sample(SHAPES, n)
    colours = rng.sample(list(COLOURS), n)
    specs = tuple(ShapeSpec(k, c) for k, c in zip(kinds, colours))
    background = rng.choice(BACKGROUNDS)
    img = _background(rng, background, size)
    tint = None if background == "gradient" else background_tint(img)  # a gradient has two colours
    draw = ImageDraw.Draw(img)
    w, h = size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    slots = [(0.5, 0.5)] if n == 1 else rng.choice([[(0.28, 0.5), (0.72, 0.5)], [(0.5, 0.28), (0.5, 0.72)], [(0.3, 0.3), (0.7, 0.7)]])
    for spec, (fx, fy) in zip(specs, slots):
        r = side * (rng.uniform(0.18, 0.3) if n == 1 else rng.uniform(0.13, 0.19))
        cx = left + fx * side + rng.uniform(-0.04, 0.04) * side
        cy = top + fy * side + rng.uniform(-0.04, 0.04) * side
        _draw_shape(draw, spec, (int(cx - r), int(cy - r), int(cx + r), int(cy + r)), rng)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return Sample(image=img, shapes=specs, background=background, background_tint=tint)


LABELS_FILE = "labels.csv"


def write_collection(root: Path, batches: int = 3, per_batch: int = 120, seed: int = 0, copies: int = 0) -> Path:
    """Write `batches` folders of images under root, plus labels.csv (path, caption, labels).

    Sizes and formats vary (square and 4:3, JPEG and PNG), and the last batch carries two files that
    are not images, so the run shows how unusable files are recorded, and `copies` real copies of the
    first batch's images (write_copies), so the near-duplicate page has copies to show.
    """
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for b in range(1, batches + 1):
        batch_dir = root / f"batch-{b:03d}"
        batch_dir.mkdir(exist_ok=True)
        for i in range(per_batch):
            size = rng.choice([(96, 96), (128, 96), (96, 128), (160, 160)])
            sample = make_sample(rng, size)
            if i % 3 == 0:
                name = f"img-{i:04d}.png"
                sample.image.save(batch_dir / name)
            else:
                name = f"img-{i:04d}.jpg"
                sample.image.save(batch_dir / name, quality=90)
            rows.append((f"{batch_dir.name}/{name}", sample.caption(), ";".join(sample.labels)))
    last = root / f"batch-{batches:03d}"
    rows += write_copies(root, rows, last, copies)
    (last / "broken-empty.jpg").write_bytes(b"")
    (last / "notes-not-an-image.png").write_text("this file has an image extension but holds text\n")
    with open(root / LABELS_FILE, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption", "labels"])
        writer.writerows(rows)
    return root / LABELS_FILE


COPY_KINDS = ("reencoded", "resized", "cropped", "recoloured", "png", "same-bytes")


def write_copies(root: Path, rows: list[tuple[str, str, str]], folder: Path, copies: int) -> list[tuple[str, str, str]]:
    """`copies` copies of the first images of the collection, one of each kind in turn (COPY_KINDS:
    re-encoded as JPEG, resized, cropped by about 2% a side, recoloured, saved as PNG, the same bytes),
    written into `folder` as `copy-<kind>-of-<name>`; their label rows (those of their originals)."""
    out = []
    for k, (path, caption, labels) in enumerate(rows[:copies]):
        kind = COPY_KINDS[k % len(COPY_KINDS)]
        source = root / path
        stem = Path(path).stem
        with Image.open(source) as opened:
            img = opened.convert("RGB")
        w, h = img.size
        if kind == "same-bytes":
            name = f"copy-{kind}-of-{Path(path).name}"
            (folder / name).write_bytes(source.read_bytes())
        elif kind == "png":
            name = f"copy-{kind}-of-{stem}.png"
            img.save(folder / name)
        else:
            name = f"copy-{kind}-of-{stem}.jpg"
            if kind == "resized":
                img = img.resize((w * 3 // 2, h * 3 // 2), Image.BICUBIC)
            elif kind == "cropped":
                img = img.crop((w // 50, h // 50, w - w // 50, h - h // 50))
            elif kind == "recoloured":
                img = ImageEnhance.Brightness(img).enhance(1.05)
            img.save(folder / name, quality=60 if kind == "reencoded" else 90)
        out.append((f"{folder.name}/{name}", caption, labels))
    return out


def read_labels(path: Path) -> dict[str, set[str]]:
    with open(path, newline="") as f:
        return {row["path"]: set(filter(None, row["labels"].split(";"))) for row in csv.DictReader(f)}
