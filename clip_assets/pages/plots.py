"""Small pictures for the Dagster UI, drawn with Pillow (no plotting library needed).

Dagster renders markdown metadata, including images given as data URIs, so a materialization can
show a person a plot rather than a column of numbers. A picture with one panel or row per category
draws at most MAX_CATEGORIES_DRAWN of them (the first, in prompt order) and says how many it left
out: thousands of categories would make a picture of megabytes in the event log, and a JPEG cannot be
taller than 65,500 pixels.
"""

from __future__ import annotations

import base64
import io

from PIL import Image, ImageDraw, ImageFont

PANEL_W, PANEL_H, COLUMNS = 260, 140, 3
MAX_CATEGORIES_DRAWN = 30
NOTE_H = 16  # a line of text under a picture that leaves categories out


def categories_left_out_note(shown: int, total: int) -> str:
    """What a picture that draws `shown` of `total` categories says about the others ('' when it shows all)."""
    if shown >= total:
        return ""
    return f"first {shown} of {total:,} categories (prompt order); the gallery page shows them all"


def first_categories(items: dict, max_categories: int | None) -> tuple[dict, str]:
    """The first `max_categories` entries of a per-category dict (None: all), and the note that says so."""
    if max_categories is None or len(items) <= max_categories:
        return items, ""
    return dict(list(items.items())[:max_categories]), categories_left_out_note(max_categories, len(items))


def _canvas(panels: int, note: str = "") -> tuple[Image.Image, ImageDraw.ImageDraw, ImageFont.ImageFont]:
    """A white grid of `panels` panels, COLUMNS wide; `note` written on a line under them."""
    rows = max(1, -(-panels // COLUMNS))
    img = Image.new("RGB", (PANEL_W * COLUMNS, PANEL_H * rows + (NOTE_H if note else 0)), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    if note:
        draw.text((10, PANEL_H * rows + 2), note, fill="black", font=font)
    return img, draw, font


def _panel_origin(index: int) -> tuple[int, int]:
    return (index % COLUMNS) * PANEL_W, (index // COLUMNS) * PANEL_H


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def score_histograms_png(
    histograms: dict[str, tuple[float, float, list[int], float, str]], max_categories: int | None = MAX_CATEGORIES_DRAWN
) -> bytes:
    """One panel per category: the distribution of its match score, the threshold as a red line.
    At most `max_categories` panels (None: every category), with a line saying how many were left out."""
    histograms, note = first_categories(histograms, max_categories)
    names = list(histograms)
    img, draw, font = _canvas(len(names), note)
    for i, name in enumerate(names):
        lo, hi, counts, threshold, mode = histograms[name]
        x0, y0 = _panel_origin(i)
        left, right, top, bottom = x0 + 10, x0 + PANEL_W - 10, y0 + 22, y0 + PANEL_H - 22
        label = "probability" if mode == "single_label" else "score"
        draw.text((left, y0 + 4), f"{name} ({label})", fill="black", font=font)
        peak = max(counts) or 1
        width = (right - left) / len(counts)
        for b, n in enumerate(counts):
            h = (bottom - top) * n / peak
            draw.rectangle([left + b * width, bottom - h, left + (b + 1) * width - 1, bottom], fill=(70, 110, 190))
        draw.line([left, bottom, right, bottom], fill="gray")
        draw.text((left, bottom + 4), f"{lo:.3f}", fill="gray", font=font)
        draw.text((right - 40, bottom + 4), f"{hi:.3f}", fill="gray", font=font)
        if hi > lo and lo <= threshold <= hi:
            tx = left + (threshold - lo) / (hi - lo) * (right - left)
            draw.line([tx, top, tx, bottom], fill=(210, 30, 30), width=2)
        draw.text((left + (right - left) // 2 - 30, bottom + 4), f"thr {threshold:.3f}", fill=(210, 30, 30), font=font)
    return _png(img)


def image_markdown(data: bytes, alt: str) -> str:
    """Markdown showing a PNG or JPEG inline, as a data URI."""
    kind = "jpeg" if data[:3] == b"\xff\xd8\xff" else "png"
    return f"![{alt}](data:image/{kind};base64,{base64.b64encode(data).decode()})"


def precision_recall_png(
    curves: dict[str, tuple[list[float], list[float]]],
    marks: dict[str, list[tuple[float, float, tuple[int, int, int], str]]] | None = None,
) -> bytes:
    """One panel per category: precision (y) against recall (x) over every threshold.

    `marks` adds labelled points per category, e.g. the current and the calibrated threshold's
    (recall, precision, colour, label).
    """
    names = list(curves)
    img, draw, font = _canvas(len(names))
    for i, name in enumerate(names):
        recall, precision = curves[name]
        x0, y0 = _panel_origin(i)
        left, right, top, bottom = x0 + 34, x0 + PANEL_W - 10, y0 + 20, y0 + PANEL_H - 20

        def at(r: float, p: float) -> tuple[float, float]:
            return left + r * (right - left), bottom - p * (bottom - top)

        draw.text((x0 + 10, y0 + 4), f"{name}: precision vs recall", fill="black", font=font)
        draw.rectangle([left, top, right, bottom], outline="gray")
        draw.text((x0 + 4, top - 4), "1.0", fill="gray", font=font)
        draw.text((x0 + 4, bottom - 8), "0.0", fill="gray", font=font)
        draw.text((right - 40, bottom + 4), "recall 1", fill="gray", font=font)
        points = [at(r, p) for r, p in zip(recall, precision)]
        if len(points) > 1:
            draw.line(points, fill=(70, 110, 190), width=2)
        elif points:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=(70, 110, 190))
        for j, (r, p, colour, label) in enumerate((marks or {}).get(name, [])):
            x, y = at(r, p)
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
            draw.text((left + 4 + 70 * j, bottom + 4), label, fill=colour, font=font)
    return _png(img)
