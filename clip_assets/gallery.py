"""A static HTML report of the classifications: per category, thumbnails of the best matched images
with their scores, and the near misses, the best-scoring images just under the threshold.

A person can see at a glance whether a threshold is right: near misses that belong to the category
say it is too strict, matched images that do not say it is too loose. Thumbnails are small JPEG
files written next to the report (never the originals), so the folder can be copied or served as is.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import duckdb
from PIL import Image, ImageOps

from clip_assets.layout import DataLayout, write_text_atomically

THUMBNAIL_PX = 128


@dataclass(frozen=True)
class GalleryImage:
    image_id: str
    path: str
    batch: str
    score: float
    matched: bool


def gallery_rows(layout: DataLayout, matched_per_category: int, near_misses: int) -> dict[str, list[GalleryImage]]:
    """Per category (prompt order): its best matched images, then its best unmatched ones."""
    with duckdb.connect(str(layout.duckdb_path), read_only=True) as con:
        rows = con.execute(
            """
            WITH c AS (
                SELECT c.category, c.image_id, c.batch, coalesce(c.probability, c.score) AS value, c.matched,
                       row_number() OVER (PARTITION BY c.category, c.matched ORDER BY coalesce(c.probability, c.score) DESC, c.image_id) AS n
                FROM image_classifications c
            )
            SELECT c.category, c.image_id, m.path, c.batch, c.value, c.matched
            FROM c JOIN prompt_categories p USING (category) JOIN read_parquet(?) m USING (image_id)
            WHERE (c.matched AND c.n <= ?) OR (NOT c.matched AND c.n <= ?)
            ORDER BY p.position, c.matched DESC, c.value DESC
            """,
            [str(layout.data_dir / "manifest" / "*.parquet"), matched_per_category, near_misses],
        ).fetchall()
        categories = [r[0] for r in con.execute("SELECT category FROM prompt_categories ORDER BY position").fetchall()]
    out: dict[str, list[GalleryImage]] = {name: [] for name in categories}
    for category, image_id, path, batch, value, matched in rows:
        out[category].append(GalleryImage(image_id, path, batch, float(value), bool(matched)))
    return out


def write_thumbnail(source: Path, target: Path, size: int = THUMBNAIL_PX) -> bool:
    """A small JPEG of `source`; False when the image cannot be read any more."""
    if target.is_file():
        return True
    try:
        with Image.open(source) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((size, size))
            target.parent.mkdir(parents=True, exist_ok=True)
            img.save(target, format="JPEG", quality=80)
        return True
    except Exception:
        return False


def _card(image: GalleryImage, thumb: str | None) -> str:
    label = html.escape(image.path)
    picture = (
        f'<img src="{html.escape(thumb)}" alt="{label}" loading="eager">' if thumb else '<div class="missing">unreadable</div>'
    )
    return (
        f'<figure class="{"match" if image.matched else "near-miss"}">{picture}'
        f"<figcaption>{image.score:.3f}<br><small>{label}</small></figcaption></figure>"
    )


PAGE_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
section { margin-bottom: 2em; }
.row { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
figure { margin: 0; width: 140px; text-align: center; font-size: 12px; }
figure img { max-width: 128px; max-height: 128px; border: 3px solid #2a2; }
figure.near-miss img { border-color: #d80; }
small { color: #666; word-break: break-all; }
h3 { font-size: 14px; color: #555; margin: 0.6em 0 0.3em; }
"""

# Counts images that finished loading with pixels, so a headless browser can tell a broken page.
LOAD_CHECK = """
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
});
"""


def write_gallery(
    layout: DataLayout,
    image_root: Path,
    out_dir: Path,
    thresholds: dict[str, float] | None = None,
    matched_per_category: int = 12,
    near_misses: int = 6,
    title: str = "clip-assets gallery",
) -> Path:
    """Write out_dir/index.html and out_dir/thumbs/*.jpg; returns the page's path."""
    rows = gallery_rows(layout, matched_per_category, near_misses)
    if thresholds is None:
        with duckdb.connect(str(layout.duckdb_path), read_only=True) as con:
            thresholds = dict(con.execute("SELECT category, threshold FROM prompt_categories").fetchall())
    sections = []
    for category, images in rows.items():
        cards = {True: [], False: []}
        for image in images:
            thumb = f"thumbs/{image.image_id}.jpg"
            ok = write_thumbnail(image_root / image.path, out_dir / thumb)
            cards[image.matched].append(_card(image, thumb if ok else None))
        sections.append(
            f'<section id="{html.escape(category)}"><h2>{html.escape(category)}'
            f' <small>threshold {thresholds.get(category, float("nan")):.3f}</small></h2>'
            f"<h3>matched (best first)</h3><div class=\"row\">{''.join(cards[True]) or 'none'}</div>"
            f"<h3>near misses: best scores under the threshold</h3><div class=\"row\">{''.join(cards[False]) or 'none'}</div>"
            "</section>"
        )
    page = (
        f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
        f"<style>{PAGE_STYLE}</style><script>{LOAD_CHECK}</script></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        "<p>Green: matched. Orange: near misses. Scores are the ones thresholds apply to.</p>"
        f"{''.join(sections)}</body></html>"
    )
    index = out_dir / "index.html"
    write_text_atomically(page, index)
    return index
