"""A look at the classifications with thumbnails: a static HTML page of the whole collection, and a
small contact sheet per batch for the Dagster UI.

Per category: the best matched images with their scores, and the near misses, the best-scoring
images that were not matched, grouped by the condition that failed (the score under the threshold,
or, in multi_label files, a score that reaches it while the image is not above the neutral
descriptions by the margin). A person can see at a glance whether a setting is right: near misses
that belong to the category say it is too strict, matched images that do not say it is too loose.
Thumbnails are small JPEG files written next to the page (never the originals), so the folder can be
copied or served as is.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from clip_assets.app.templating import render
from clip_assets.classification.near_misses import (
    FAILED_CONDITION_SQL,
    NEAR_MISS_KINDS,
    NOT_ABOVE_NEUTRAL,
    NOT_IN_TOP_K,
    UNDER_THRESHOLD,
    GalleryImage,
)
from clip_assets.config.layout import DataLayout
from clip_assets.ingest.manifest import readable_manifests
from clip_assets.pages.plots import MAX_CATEGORIES_DRAWN, NOTE_H, first_categories
from clip_assets.storage.atomic_files import atomic_write, write_text_atomically
from clip_assets.storage.store_root import StoreRoot, file_source
from clip_assets.storage.warehouse import COLLECTION_PASS_MEMORY_LIMIT, connect, read_duplicate_groups

THUMBNAIL_PX = 128

DUPLICATE = "duplicate"  # a near-duplicate of its group's first image (orange on the duplicates page)


@dataclass(frozen=True)
class CategorySettings:
    mode: str
    threshold: float
    neutral_margin: float
    top_k: int


def category_settings(layout: DataLayout) -> dict[str, CategorySettings]:
    """Each category's mode, threshold, neutral margin and top_k, in the prompt files' order."""
    with connect(layout.duckdb_path, read_only=True) as con:
        rows = con.execute(
            "SELECT category, mode, threshold, neutral_margin, top_k FROM prompt_categories ORDER BY position"
        ).fetchall()
    return {name: CategorySettings(mode, threshold, margin, top_k) for name, mode, threshold, margin, top_k in rows}


def gallery_rows(
    layout: DataLayout, matched_per_category: int, near_misses: int, batch: str | None = None
) -> dict[str, list[GalleryImage]]:
    """Per category (prompt order): its best matched images, then for each failed condition its best
    unmatched ones (best: highest score, then lowest image_id). `batch`: only that batch's images,
    else the whole collection.

    One pass over the classifications keeps, per category and failed condition, a bounded best-n
    list (DuckDB's `min_by(..., n)`, an aggregate), so memory depends on the categories and n, not
    on the collection's size (DuckDB's block cache capped too); only the chosen images' paths are
    looked up in the manifests.
    """
    # the whole collection: a damaged manifest is left out with a warning, and its batch's images with it
    manifests = [str(layout.manifest_path(batch))] if batch else readable_manifests(layout)
    with connect(layout.duckdb_path, read_only=True, memory_limit=COLLECTION_PASS_MEMORY_LIMIT) as con:
        rows = con.execute(
            f"""
            WITH c AS (
                SELECT c.category, c.image_id, c.batch, coalesce(c.probability, c.score) AS value, c.matched,
                       {FAILED_CONDITION_SQL} AS failed, c.pos_sim - c.neutral_sim AS above_neutral
                FROM image_classifications c
                WHERE ?::VARCHAR IS NULL OR c.batch = ?
            ), best AS (
                SELECT category, failed, unnest(min_by(
                    {{'image_id': image_id, 'batch': batch, 'value': value, 'matched': matched,
                      'above_neutral': above_neutral}},
                    {{'descending': -value, 'image_id': image_id}},
                    greatest(1, CASE WHEN failed IS NULL THEN ?::BIGINT ELSE ?::BIGINT END)
                ), recursive := true)
                FROM c GROUP BY category, failed
                HAVING CASE WHEN failed IS NULL THEN ?::BIGINT ELSE ?::BIGINT END > 0
            )
            SELECT b.category, b.image_id, m.path, b.batch, b.value, b.matched, b.failed, b.above_neutral
            FROM best b JOIN prompt_categories p USING (category)
                 JOIN (SELECT image_id, path FROM read_parquet(?)) m USING (image_id)
            ORDER BY p.position, b.matched DESC, b.failed, b.value DESC, b.image_id
            """,
            [batch, batch, matched_per_category, near_misses, matched_per_category, near_misses, manifests],
        ).fetchall()
        categories = [r[0] for r in con.execute("SELECT category FROM prompt_categories ORDER BY position").fetchall()]
    out: dict[str, list[GalleryImage]] = {name: [] for name in categories}
    for category, image_id, path, batch_name, value, matched, failed, above_neutral in rows:
        out[category].append(GalleryImage(
            image_id, path, batch_name, float(value), bool(matched), failed,
            None if above_neutral is None else float(above_neutral),
        ))
    return out


def thumbnail(source: Path | Callable[[], bytes], size: int = THUMBNAIL_PX) -> Image.Image | None:
    """An RGB image of `source` (a file, or what reads an object's bytes: store_root.file_source) at most
    `size` pixels a side; None when it cannot be read any more."""
    try:
        with Image.open(io.BytesIO(source()) if callable(source) else source) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((size, size))
            return img
    except Exception:  # PIL raises many types for unreadable files
        return None


def write_thumbnail(source: Path | Callable[[], bytes], target: Path, size: int = THUMBNAIL_PX) -> bool:
    """A small JPEG of `source`; False when the image cannot be read any more."""
    if target.is_file():
        return True
    img = thumbnail(source, size)
    if img is None:
        return False
    with atomic_write(target) as tmp:
        img.save(tmp, format="JPEG", quality=80)
    return True


def near_miss_heading(kind: str, settings: CategorySettings) -> str:
    """What a group of near misses failed, in words."""
    if kind == UNDER_THRESHOLD:
        what = "probability" if settings.mode == "single_label" else "score"
        return f"near misses: {what} under the threshold ({settings.threshold:.3f})"
    if kind == NOT_ABOVE_NEUTRAL:
        return (
            f"near misses: score reaches the threshold, but the image is not above the neutral descriptions "
            f"by the margin (pos_sim < neutral_sim + {settings.neutral_margin:.3f})"
        )
    return (
        f"near misses: probability reaches the threshold, but {settings.top_k} other "
        f"categor{'y is' if settings.top_k == 1 else 'ies are'} more probable (top_k = {settings.top_k})"
    )


@dataclass(frozen=True)
class ImageGroup:
    kind: str | None  # None: matched; else the condition its near misses failed
    heading: str
    images: list[GalleryImage]


@dataclass(frozen=True)
class GallerySection:
    category: str
    settings: CategorySettings
    groups: list[ImageGroup]


def gallery_sections(
    layout: DataLayout, matched_per_category: int = 12, near_misses: int = 6, batch: str | None = None
) -> list[GallerySection]:
    """The gallery's content, per category in prompt order: its matched images, then a group of near
    misses per condition its mode can fail (`gallery_rows` chose them)."""
    rows = gallery_rows(layout, matched_per_category, near_misses, batch)
    settings = category_settings(layout)
    sections = []
    for category, images in rows.items():
        conf = settings[category]
        kinds = [UNDER_THRESHOLD, NOT_ABOVE_NEUTRAL] if conf.mode == "multi_label" else [UNDER_THRESHOLD, NOT_IN_TOP_K]
        groups = [ImageGroup(None, "matched (best first)", [i for i in images if i.matched])]
        groups += [ImageGroup(kind, near_miss_heading(kind, conf), [i for i in images if i.failed == kind])
                   for kind in kinds]
        sections.append(GallerySection(category, conf, groups))
    return sections


TIER_HEADINGS = {
    "exact": ("Exact copies", "The same bytes: each file is the group's first one, byte for byte."),
    "copy": ("Copies", "The same picture re-encoded, resized, slightly cropped or recoloured: the embedding "
             "puts them at or above the copy threshold, and their perceptual hashes and colour layouts agree."),
    "look-alike": ("Look-alikes", "Similar pictures, not copies of one another: at or above the look-alike "
                   "threshold. Nothing here needs resolving."),
}


@dataclass
class DuplicateGroup:
    """One near-duplicate group as the page shows it: its images (first image first: matched, green; the
    others DUPLICATE, orange, scored by their similarity to it) and their rows of duplicate_groups."""

    group_id: str
    tier: str
    images: list[GalleryImage]
    rows: list[dict]

    @property
    def suggested(self) -> str:
        return next((r["path"] for r in self.rows if r["suggested_keep"]), self.rows[0]["path"])


def groups_from_rows(rows: list[dict]) -> list[DuplicateGroup]:
    """Groups from rows of duplicate_groups (dicts, in group and position order)."""
    groups: dict[str, DuplicateGroup] = {}
    for r in rows:
        first = r["position"] == 0
        group = groups.setdefault(r["group_id"], DuplicateGroup(r["group_id"], r["tier"], [], []))
        group.images.append(GalleryImage(r["image_id"], r["path"], r["batch"], float(r["similarity"]), first,
                                         None if first else DUPLICATE))
        group.rows.append(r)
    return list(groups.values())


def duplicate_groups(layout: DataLayout, max_groups: int = 200, tiers: tuple[str, ...] | None = None) -> list[DuplicateGroup]:
    """The largest near-duplicate groups of each tier (of `tiers`; None: every tier), exact copies first."""
    return groups_from_rows(read_duplicate_groups(layout.duckdb_path, max_groups, tiers))


def largest_groups(rows: list[dict], max_groups: int) -> list[DuplicateGroup]:
    """The `max_groups` largest groups of each tier among `rows` (read_duplicate_groups' order)."""
    groups = groups_from_rows(rows)
    order = {"exact": 0, "copy": 1, "look-alike": 2}
    groups.sort(key=lambda g: (order.get(g.tier, 3), -len(g.images), g.group_id))
    kept, per_tier = [], {}
    for g in groups:
        per_tier[g.tier] = per_tier.get(g.tier, 0) + 1
        if per_tier[g.tier] <= max_groups:
            kept.append(g)
    return kept


def _local_thumbnails(images, image_root: Path | StoreRoot, out_dir: Path) -> dict[str, str | None]:
    """Each image's thumbnail written under out_dir/thumbs/, by image_id: its relative URL, or None if unreadable."""
    thumbs = {}
    for image in images:
        thumb = f"thumbs/{image.image_id}.jpg"
        thumbs[image.image_id] = thumb if write_thumbnail(file_source(image_root, image.path), out_dir / thumb) else None
    return thumbs


def write_gallery(
    layout: DataLayout,
    image_root: Path | StoreRoot,
    out_dir: Path,
    matched_per_category: int = 12,
    near_misses: int = 6,
    title: str = "clip-assets gallery",
) -> Path:
    """Write out_dir/index.html and out_dir/thumbs/*.jpg; returns the page's path. The page is the
    app's gallery (templates/gallery.html), without its navigation.

    `near_misses` is per failed condition: up to that many images under the threshold, and as many
    that reached it but failed the neutral (or top_k) condition.
    """
    sections = gallery_sections(layout, matched_per_category, near_misses)
    images = [i for section in sections for group in section.groups for i in group.images]
    thumbs = _local_thumbnails(images, image_root, out_dir)
    index = out_dir / "index.html"
    write_text_atomically(render("gallery.html", title=title, sections=sections, thumbs=thumbs), index)
    return index


# The contact sheet: one row per category, small enough to live in Dagster's event log.
SHEET_THUMB_PX = 52
SHEET_LABEL_W = 96
SHEET_CAPTION_H = 12
SHEET_GAP = 4
BORDER = {None: (40, 170, 40), UNDER_THRESHOLD: (220, 130, 0), NOT_ABOVE_NEUTRAL: (135, 100, 200),
          NOT_IN_TOP_K: (60, 120, 210)}
LEGEND = [(None, "matched"), (UNDER_THRESHOLD, "under threshold"), (NOT_ABOVE_NEUTRAL, "not above neutral + margin"),
          (NOT_IN_TOP_K, "not in top_k")]


def contact_sheet(
    layout: DataLayout, image_root: Path | StoreRoot, batch: str, matched_per_category: int = 3, near_misses: int = 2
) -> bytes:
    """A JPEG grid for one batch: per category its best matches, then its near misses of each kind,
    each thumbnail framed in its group's colour with its score under it."""
    rows = gallery_rows(layout, matched_per_category, near_misses, batch=batch)
    return draw_contact_sheet(image_root, rows, matched_per_category + 2 * near_misses)


def draw_contact_sheet(image_root: Path | StoreRoot, rows: dict[str, list[GalleryImage]], columns: int,
                       max_categories: int | None = MAX_CATEGORIES_DRAWN) -> bytes:
    """The contact sheet of `gallery_rows`' rows (or the same rows gathered while classifying): at most
    `max_categories` rows (None: every category; a JPEG is at most 65,500 pixels tall, about 960 rows),
    with a line under them saying how many categories were left out."""
    rows, note = first_categories(rows, max_categories)
    cell_w, cell_h = SHEET_THUMB_PX + SHEET_GAP, SHEET_THUMB_PX + SHEET_CAPTION_H + SHEET_GAP
    legend_h = 14
    grid_h = legend_h + max(1, len(rows)) * cell_h
    sheet = Image.new("RGB", (SHEET_LABEL_W + columns * cell_w, grid_h + (2 * NOTE_H if note else 0)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    if note:  # two lines: the sheet is narrower than the note
        first, _, rest = note.partition("; ")
        draw.text((4, grid_h + 2), first + ";", fill="black", font=font)
        draw.text((4, grid_h + 2 + NOTE_H), rest, fill="black", font=font)
    x = 4
    for kind, text in LEGEND:
        draw.rectangle([x, 3, x + 8, 11], fill=BORDER[kind])
        draw.text((x + 11, 2), text, fill="black", font=font)
        x += 18 + int(draw.textlength(text, font=font))
    for r, (category, images) in enumerate(rows.items()):
        y = legend_h + r * cell_h
        draw.text((4, y + SHEET_THUMB_PX // 2 - 6), category[:15], fill="black", font=font)
        matched = [i for i in images if i.matched]
        missed = sorted((i for i in images if not i.matched), key=lambda i: (NEAR_MISS_KINDS.index(i.failed), -i.score))
        for c, image in enumerate(matched + missed):
            x = SHEET_LABEL_W + c * cell_w
            draw.rectangle([x, y, x + SHEET_THUMB_PX - 1, y + SHEET_THUMB_PX - 1], fill=BORDER[image.failed])
            thumb = thumbnail(file_source(image_root, image.path), SHEET_THUMB_PX - 6)
            if thumb is not None:
                sheet.paste(thumb, (x + (SHEET_THUMB_PX - thumb.width) // 2, y + (SHEET_THUMB_PX - thumb.height) // 2))
            draw.text((x + 2, y + SHEET_THUMB_PX), f"{image.score:.3f}", fill=(80, 80, 80), font=font)
        if not images:
            draw.text((SHEET_LABEL_W, y + SHEET_THUMB_PX // 2 - 6), "no images", fill="gray", font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=60, optimize=True)  # about 40 kB: it lives in the event log
    return buffer.getvalue()


def prune_pages(parent: Path, keep: int) -> list[Path]:
    """Remove all but the `keep` newest page folders (one per run) under `parent`; the removed ones."""
    folders = sorted((p for p in parent.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime_ns, reverse=True) \
        if parent.is_dir() else []
    for old in folders[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return folders[keep:]


def write_duplicates_page(layout: DataLayout, image_root: Path | StoreRoot, out_dir: Path, max_groups: int = 200,
                          title: str = "clip-assets near-duplicates", groups: list[DuplicateGroup] | None = None,
                          summary: dict | None = None) -> Path:
    """out_dir/index.html: the largest near-duplicate groups of each tier, one section per tier, one row
    per group, images side by side with their similarity to the group's first image; thumbnails in
    out_dir/thumbs/. `groups`: the groups to show (the near_duplicates asset passes the ones it is about
    to store); None: those DuckDB holds. The page is the app's (templates/duplicates.html), without its
    navigation and without the choices a person makes there."""
    if groups is None:
        groups = duplicate_groups(layout, max_groups)
    thumbs = _local_thumbnails([i for group in groups for i in group.images], image_root, out_dir)
    index = out_dir / "index.html"
    write_text_atomically(render("duplicates.html", title=title, groups=groups, thumbs=thumbs, tiers=TIER_HEADINGS,
                                 summary=summary or {}, choices={}, actions=False, show_look_alikes=True,
                                 look_alike_groups=0), index)
    return index
