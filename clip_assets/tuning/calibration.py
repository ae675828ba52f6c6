"""Evaluation against a labelled sample, and thresholds calibrated from it.

People label a sample of images (the labels file, clip_assets.tuning.labels_file, and the review
pages' verdicts, clip_assets.tuning.label_sources; a verdict judges one category of an image, and
only judged cells are scored or tuned on). From the stored classification scores this module scores
the current thresholds (precision, recall and F1 per category and macro); splits the labelled images
in two by a hash of their id and proposes, per category, the threshold and neutral margin that
maximise F1 on the tuning half (or reach a target precision with the most recall), scored before and
after on the held-out half only, so no threshold is tuned and judged on the same images; and writes
the proposal as a TOML overrides file that `clip_assets.classification.prompts` merges over the
prompt files (`prompts/calibrated_thresholds.toml`). Only multi_label categories are calibrated (their
rule is score >= threshold and pos_sim >= neutral_sim + neutral_margin); single_label ones are scored
but keep their settings.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clip_assets.classification.prompts import MULTI_LABEL, OVERRIDES_FILE
from clip_assets.config.layout import DataLayout
from clip_assets.ingest.manifest import readable_manifests
from clip_assets.pages.plots import precision_recall_png
from clip_assets.storage.atomic_files import write_text_atomically
from clip_assets.storage.warehouse import COLLECTION_PASS_MEMORY_LIMIT, connect
from clip_assets.storage.warehouse import exists as warehouse_exists
from clip_assets.tuning.evaluation import CategoryScore, macro_f1
from clip_assets.tuning.labels_file import LabelRows, LabelsFileError

DEFAULT_HELDOUT_FRACTION = 0.5


class NotClassifiedError(LookupError):
    """Nothing to calibrate against yet: no DuckDB file with classifications."""


def stable_fraction(image_id: str, salt: str | None = None) -> float:
    """A number in [0, 1) fixed by the image id: the same image lands in the same split, fold or
    sample. A `salt` draws an unrelated number from the same ids (hashed as "salt:image_id")."""
    key = image_id if salt is None else f"{salt}:{image_id}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def is_heldout(image_id: str, fraction: float = DEFAULT_HELDOUT_FRACTION) -> bool:
    """Stable split: the same image is always on the same side, whatever else is labelled."""
    return stable_fraction(image_id) < fraction


@dataclass
class LabelledScores:
    """Classification numbers of the labelled images, as (images, categories) arrays."""

    image_ids: list[str]
    paths: list[str]
    categories: list[str]
    modes: list[str]
    score: np.ndarray  # the number the threshold applies to
    neutral_gap: np.ndarray  # pos_sim - neutral_sim; NaN where a category has no neutral descriptions
    matched: np.ndarray  # bool: the rule's or adapter's decision (model_matched), never a person's
    truth: np.ndarray  # bool, from the labels
    judged: np.ndarray  # bool: the cells the labels judge; only those are scored and tuned on
    thresholds: np.ndarray  # (C,) current
    neutral_margins: np.ndarray  # (C,) current
    unmatched_labels: list[str] = field(default_factory=list)  # label rows naming no classified image
    unknown_categories: list[str] = field(default_factory=list)  # labels naming no category


def load_labelled_scores(layout: DataLayout, labels: LabelRows) -> LabelledScores:
    """Join the labels with the stored classifications (DuckDB) and the manifests (paths)."""
    if not warehouse_exists(layout.duckdb_path):
        raise NotClassifiedError(
            f"No DuckDB file at {layout.duckdb_path} (nor a warehouse of parquet files, with CLIP_ASSETS_WAREHOUSE=parquet): materialize prompt_centroids and image_classifications "
            "for the labelled images' batches first (CLIP_ASSETS_DATA_DIR says where to look)."
        )
    keys = pa.table({"key": list(labels.labels)})
    manifests = readable_manifests(layout)  # a damaged one is left out with a warning
    with connect(layout.duckdb_path, read_only=True, memory_limit=COLLECTION_PASS_MEMORY_LIMIT) as con:
        con.register("labelled", keys)
        cats = con.execute("SELECT category, mode, threshold, neutral_margin FROM prompt_categories ORDER BY position").fetchall()
        if not cats:
            raise NotClassifiedError(f"No prompt categories in {layout.duckdb_path}: materialize prompt_centroids first.")
        categories = [c[0] for c in cats]
        con.register("category_columns", pa.table({"category": categories, "j": list(range(len(categories)))}))
        # The labelled images are picked from the manifests first, then only their classification rows
        # are kept, and they come back as numbers (image row, category column, scores), not strings:
        # what is held is the labelled sample's arrays (and DuckDB's capped block cache), whatever the
        # collection's size. 100k labelled images x 50 categories are 5M rows.
        labelled_images = f"""
            WITH m AS (
                SELECT l.key, m.image_id, m.path
                FROM (SELECT image_id, path FROM read_parquet(?)) m JOIN labelled l ON l.key = m.{labels.key}
            )"""
        images = con.sql(
            labelled_images + """
            SELECT key, any_value(image_id) AS image_id, any_value(path) AS path FROM m
            WHERE image_id IN (SELECT image_id FROM image_classifications JOIN category_columns USING (category))
            GROUP BY key ORDER BY key
            """,
            params=[manifests],
        ).to_arrow_table()
        if images.num_rows == 0:
            raise LabelsFileError(
                f"None of the {len(labels.labels)} labelled images has classifications: the labels file's "
                f"'{labels.key}' values must match the manifest (paths relative to CLIP_ASSETS_IMAGE_ROOT)."
            )
        con.register("image_rows", pa.table({"key": images["key"], "i": np.arange(images.num_rows)}))
        rows = con.sql(
            labelled_images + """
            SELECT r.i, a.j,
                   CASE WHEN c.mode = 'single_label' THEN c.probability ELSE c.score END AS value,
                   c.pos_sim - c.neutral_sim AS neutral_gap, coalesce(c.model_matched, c.matched) AS matched
            FROM image_classifications c JOIN m USING (image_id) JOIN image_rows r ON r.key = m.key
                 JOIN category_columns a USING (category)
            """,
            params=[manifests],
        ).to_arrow_table()
    keys_found = images["key"].to_pylist()
    image_ids, paths = images["image_id"].to_pylist(), images["path"].to_pylist()
    n, c = len(keys_found), len(categories)
    i, j = rows["i"].to_numpy(), rows["j"].to_numpy()
    score = np.full((n, c), np.nan, dtype=np.float64)
    gap = np.full((n, c), np.nan, dtype=np.float64)
    matched = np.zeros((n, c), dtype=bool)
    score[i, j] = pc.fill_null(pc.cast(rows["value"], pa.float64()), np.nan).to_numpy()
    gap[i, j] = pc.fill_null(pc.cast(rows["neutral_gap"], pa.float64()), np.nan).to_numpy()
    matched[i, j] = pc.fill_null(rows["matched"], False).to_numpy(zero_copy_only=False)
    col = {name: j for j, name in enumerate(categories)}
    truth = np.zeros((n, c), dtype=bool)
    known = np.ones((n, c), dtype=bool)
    for r, k in enumerate(keys_found):
        for name in labels.labels[k]:
            if name in col:
                truth[r, col[name]] = True
        if k in labels.judged:
            known[r] = [name in labels.judged[k] for name in categories]
    named = set().union(*labels.labels.values()) if labels.labels else set()
    return LabelledScores(
        image_ids=image_ids,
        paths=paths,
        categories=categories,
        modes=[c[1] for c in cats],
        score=score,
        neutral_gap=gap,
        matched=matched,
        truth=truth,
        thresholds=np.array([c[2] for c in cats], dtype=np.float64),
        neutral_margins=np.array([c[3] for c in cats], dtype=np.float64),
        unmatched_labels=sorted(set(labels.labels) - set(keys_found)),
        unknown_categories=sorted(named - set(categories)),
        judged=known,
    )


def predict(score: np.ndarray, gap: np.ndarray, threshold: float, margin: float) -> np.ndarray:
    """The multi_label rule for one category's column; NaN gap = no neutral condition."""
    return (score >= threshold) & (np.isnan(gap) | (gap >= margin))


def category_scores(predicted: np.ndarray, truth: np.ndarray, categories: list[str],
                    known: np.ndarray | None = None) -> list[CategoryScore]:
    """Per category, the counts over the labelled images (`known`: only the cells the labels judge)."""
    predicted, truth = (predicted, truth) if known is None else (predicted & known, truth & known)
    return [
        CategoryScore(
            name,
            int((predicted[:, j] & truth[:, j]).sum()),
            int((predicted[:, j] & ~truth[:, j]).sum()),
            int((~predicted[:, j] & truth[:, j]).sum()),
        )
        for j, name in enumerate(categories)
    ]


def predictions(data: LabelledScores, thresholds: np.ndarray, margins: np.ndarray) -> np.ndarray:
    """Matched flags under the given settings (single_label categories keep their stored flags)."""
    out = data.matched.copy()
    for j, mode in enumerate(data.modes):
        if mode == MULTI_LABEL:
            out[:, j] = predict(data.score[:, j], data.neutral_gap[:, j], thresholds[j], margins[j])
    return out


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    neutral_margin: float
    precision: float  # on the tuning rows
    recall: float
    f1: float
    reached_target: bool


def sweep(score: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every distinct score taken as threshold (descending): threshold, precision, recall."""
    if len(score) == 0:
        return np.empty(0), np.empty(0), np.empty(0)
    order = np.argsort(-score, kind="stable")
    s, t = score[order], truth[order]
    tp = np.cumsum(t)
    fp = np.cumsum(~t)
    last = np.r_[s[1:] != s[:-1], True]  # the threshold includes every row with an equal score
    positives = max(int(truth.sum()), 1)
    tp, fp, thr = tp[last], fp[last], s[last]
    return thr, tp / np.maximum(tp + fp, 1), tp / positives


def choose_threshold(
    score: np.ndarray, gap: np.ndarray, truth: np.ndarray, current_margin: float, target_precision: float | None = None
) -> ThresholdChoice:
    """Threshold (midway to the next lower score) and neutral margin for one category."""
    if np.isnan(gap).all():
        margins = [current_margin]
    else:
        margins = sorted({current_margin, *np.quantile(gap[~np.isnan(gap)], np.linspace(0, 0.9, 10)).tolist()})
    best: tuple | None = None
    for margin in margins:
        eligible = np.isnan(gap) | (gap >= margin)
        if not eligible.any():
            continue
        thr, precision, recall = sweep(score[eligible], truth[eligible])
        recall = recall * truth[eligible].sum() / max(truth.sum(), 1)  # positives the margin drops are misses
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
        if target_precision is None:
            key = f1
        else:
            ok = precision >= target_precision
            # The most recall at the target precision; failing that, the most precise threshold.
            key = np.where(ok, 2.0 + recall, precision)
        i = int(np.argmax(key))
        candidate = (float(key[i]), margin == current_margin, margin, thr, i, precision[i], recall[i], f1[i],
                     target_precision is None or bool(precision[i] >= target_precision))
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    if best is None:
        return ThresholdChoice(float(np.nanmax(score)) + 1e-3, current_margin, 0.0, 0.0, 0.0, False)
    _, _, margin, thr, i, p, r, f, reached = best
    threshold = float((thr[i] + thr[i + 1]) / 2) if i + 1 < len(thr) else float(thr[i]) - 1e-4
    return ThresholdChoice(round(threshold, 6), round(float(margin), 6), float(p), float(r), float(f), reached)


@dataclass
class CalibrationReport:
    categories: list[str]
    old_thresholds: np.ndarray
    old_margins: np.ndarray
    new_thresholds: np.ndarray
    new_margins: np.ndarray
    choices: dict[str, ThresholdChoice]
    before: list[CategoryScore]  # held-out rows, current settings
    after: list[CategoryScore]  # held-out rows, proposed settings
    tuning_images: int
    heldout_images: int
    target_precision: float | None

    @property
    def macro_f1_before(self) -> float:
        return macro_f1(self.before)

    @property
    def macro_f1_after(self) -> float:
        return macro_f1(self.after)

    def overrides_toml(self) -> str:
        lines = [
            "# Thresholds calibrated from labelled images by `clip-assets calibrate`",
            f"# ({self.tuning_images} images to tune, {self.heldout_images} held out to score;"
            f" target precision {self.target_precision if self.target_precision is not None else 'none: best F1'}).",
            f"# Held-out macro F1: {self.macro_f1_before:.3f} before, {self.macro_f1_after:.3f} after.",
            "# These values override the prompt files' threshold and neutral_margin. Delete this file to go back.",
        ]
        for j, name in enumerate(self.categories):
            if name not in self.choices:
                continue
            b, a = self.before[j], self.after[j]
            lines += [
                "",
                f"[categories.{toml_key(name)}]",
                f"# held-out F1 {b.f1:.3f} -> {a.f1:.3f}; was threshold {self.old_thresholds[j]:g},"
                f" neutral_margin {self.old_margins[j]:g}",
                f"threshold = {self.new_thresholds[j]:.6f}",
                f"neutral_margin = {self.new_margins[j]:.6f}",
            ]
        return "\n".join(lines) + "\n"

    def table(self) -> str:
        lines = [
            f"held-out images: {self.heldout_images} (tuned on {self.tuning_images} others)",
            f"{'category':<14} {'threshold':>19} {'margin':>19} {'precision':>13} {'recall':>13} {'F1':>13}",
        ]
        for j, name in enumerate(self.categories):
            b, a = self.before[j], self.after[j]
            lines.append(
                f"{name:<14} {self.old_thresholds[j]:>8.4f} -> {self.new_thresholds[j]:<7.4f} "
                f"{self.old_margins[j]:>8.4f} -> {self.new_margins[j]:<7.4f} "
                f"{b.precision:>5.3f} -> {a.precision:<5.3f} {b.recall:>5.3f} -> {a.recall:<5.3f} "
                f"{b.f1:>5.3f} -> {a.f1:<5.3f}"
            )
        lines.append(f"macro F1 on held-out images: {self.macro_f1_before:.3f} -> {self.macro_f1_after:.3f}")
        return "\n".join(lines)


def toml_key(name: str) -> str:
    return name if name.replace("_", "").replace("-", "").isalnum() else '"' + name.replace('"', '\\"') + '"'


def tuned_settings(data: LabelledScores, rows: np.ndarray, target_precision: float | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, ThresholdChoice]]:
    """Thresholds and neutral margins of every multi_label category chosen on `rows` (a mask or
    indices) where the labels judge it; a category with no labelled image there keeps its current ones."""
    new_t, new_m = data.thresholds.copy(), data.neutral_margins.copy()
    choices = {}
    chosen = np.zeros(len(data.image_ids), dtype=bool)
    chosen[rows] = True
    for j, (name, mode) in enumerate(zip(data.categories, data.modes)):
        here = chosen & data.judged[:, j]
        if mode != MULTI_LABEL or not data.truth[here, j].any():
            continue  # nothing to learn a threshold from: keep the current one
        choice = choose_threshold(
            data.score[here, j], data.neutral_gap[here, j], data.truth[here, j], data.neutral_margins[j], target_precision
        )
        choices[name] = choice
        new_t[j], new_m[j] = choice.threshold, choice.neutral_margin
    return new_t, new_m, choices


def calibrate(
    data: LabelledScores,
    target_precision: float | None = None,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> CalibrationReport:
    """Tune on one part of the labelled images, score before/after on the other."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be between 0 and 1, got {heldout_fraction}")
    if target_precision is not None and not 0 < target_precision <= 1:
        raise ValueError(f"target_precision must be above 0 and at most 1, got {target_precision}")
    heldout = np.array([is_heldout(i, heldout_fraction) for i in data.image_ids], dtype=bool)
    if heldout.all() or not heldout.any():
        raise LabelsFileError(
            f"{len(heldout)} labelled images cannot be split into tuning and held-out parts; label more images."
        )
    tune = ~heldout
    new_t, new_m, choices = tuned_settings(data, tune, target_precision)
    truth, known, cats = data.truth[heldout], data.judged[heldout], data.categories
    return CalibrationReport(
        categories=data.categories,
        old_thresholds=data.thresholds,
        old_margins=data.neutral_margins,
        new_thresholds=new_t,
        new_margins=new_m,
        choices=choices,
        before=category_scores(predictions(data, data.thresholds, data.neutral_margins)[heldout], truth, cats, known),
        after=category_scores(predictions(data, new_t, new_m)[heldout], truth, cats, known),
        tuning_images=int(tune.sum()),
        heldout_images=int(heldout.sum()),
        target_precision=target_precision,
    )


def evaluate_current(data: LabelledScores) -> list[CategoryScore]:
    """The stored decisions of the rule or adapter (not a person's) against every labelled image."""
    return category_scores(data.matched, data.truth, data.categories, data.judged)


def precision_recall_curves(data: LabelledScores) -> dict[str, tuple[list[float], list[float]]]:
    """Per multi_label category, (recall, precision) over every threshold, at the current margin."""
    curves = {}
    for j, (name, mode) in enumerate(zip(data.categories, data.modes)):
        if mode != MULTI_LABEL:
            continue
        known = data.judged[:, j]
        eligible = known & (np.isnan(data.neutral_gap[:, j]) | (data.neutral_gap[:, j] >= data.neutral_margins[j]))
        _, precision, recall = sweep(data.score[eligible, j], data.truth[eligible, j])
        recall = recall * data.truth[eligible, j].sum() / max(data.truth[known, j].sum(), 1)
        curves[name] = (recall.tolist(), precision.tolist())
    return curves


def write_overrides(report: CalibrationReport, prompts_dir: Path) -> Path:
    """Write the proposal where the prompt files pick it up (replacing an earlier calibration)."""
    path = Path(prompts_dir) / OVERRIDES_FILE
    write_text_atomically(report.overrides_toml(), path)
    return path


def precision_recall_plot(data: LabelledScores, report: CalibrationReport | None = None) -> bytes:
    """PNG: per category the precision-recall curve on every labelled image, with the current
    threshold's point (red) and, given a report, the calibrated one's (green)."""
    settings = [("now", (210, 30, 30), data.thresholds, data.neutral_margins)]
    if report is not None:
        settings.append(("calibrated", (30, 150, 60), report.new_thresholds, report.new_margins))
    marks: dict[str, list] = {}
    for label, colour, thresholds, margins in settings:
        for s in category_scores(predictions(data, thresholds, margins), data.truth, data.categories, data.judged):
            marks.setdefault(s.category, []).append((s.recall, s.precision, colour, label))
    return precision_recall_png(precision_recall_curves(data), marks)
