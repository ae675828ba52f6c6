"""The labelled images' stored embeddings, adapters fitted on the tuning half, and the before/after table.

The labelled images are split by calibration's image-id hash (`is_heldout`). Adapters (and their
thresholds) are chosen, fitted and calibrated on the tuning half only; the table scores, on the held-out half
only, the zero-shot settings, thresholds calibrated on the whole tuning half (what `clip-assets
calibrate` proposes) and the adapted scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from clip_assets.classification.centroids import CentroidSet
from clip_assets.classification.prompts import SINGLE_LABEL
from clip_assets.classification.rules import score_matrices
from clip_assets.config.layout import DataLayout
from clip_assets.ingest.manifest import readable_manifests
from clip_assets.storage.arrow_vectors import vectors_matrix
from clip_assets.storage.damaged_files import EMBEDDINGS, readable_parquet_files
from clip_assets.storage.warehouse_schema import scratch
from clip_assets.tuning.adapters import CANDIDATES, AdapterSet, fit_adapters, select_shots
from clip_assets.tuning.calibration import (
    DEFAULT_HELDOUT_FRACTION,
    LabelledScores,
    calibrate,
    category_scores,
    is_heldout,
)
from clip_assets.tuning.evaluation import CategoryScore, macro_f1
from clip_assets.tuning.labels_file import LabelRows, LabelsFileError


@dataclass
class LabelledEmbeddings:
    """The labelled images that have embeddings of the centroids' model, in image-id order."""

    image_ids: list[str]
    embeddings: np.ndarray  # (n, d) float32, L2-normalised
    truth: np.ndarray  # (n, C) bool, categories in centroid order
    heldout: np.ndarray  # (n,) bool: calibration's held-out half
    without_embeddings: list[str] = field(default_factory=list)  # label keys with no stored embedding
    unknown_categories: list[str] = field(default_factory=list)
    judged: np.ndarray | None = None  # (n, C) bool: the cells the labels judge; None: every one

    def __post_init__(self):
        if self.judged is None:
            self.judged = np.ones(self.truth.shape, dtype=bool)


def load_labelled_embeddings(layout: DataLayout, labels: LabelRows, centroids: CentroidSet,
                             heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> LabelledEmbeddings:
    """Join the labels with the manifests (paths) and the embedding files; no DuckDB file is opened."""
    files = [str(p) for p in readable_parquet_files(layout.embedding_files(), EMBEDDINGS)[0]]  # damaged: left out
    dim = centroids.dim
    found: dict[str, tuple[str, np.ndarray]] = {}
    if files and layout.manifest_dir.is_dir():
        with scratch() as con:
            con.register("labelled", pa.table({"key": list(labels.labels)}))
            match = "e.image_id" if labels.key == "image_id" else "m.path"
            table = con.sql(
                f"""
                SELECT l.key, e.image_id, e.embedding
                FROM read_parquet(?) e JOIN read_parquet(?) m USING (image_id) JOIN labelled l ON l.key = {match}
                WHERE e.model = ? ORDER BY e.image_id
                """,
                params=[files, readable_manifests(layout), centroids.model],
            ).to_arrow_table()
        if table.num_rows:
            table = table.set_column(2, "embedding", table["embedding"].cast(pa.list_(pa.float32(), dim)))
            matrix = vectors_matrix(table["embedding"])
            for i, (key, image_id) in enumerate(zip(table["key"].to_pylist(), table["image_id"].to_pylist())):
                found[key] = (image_id, matrix[i])
    keys = sorted(found, key=lambda k: found[k][0])
    categories = centroids.categories
    named = set().union(*labels.labels.values()) if labels.labels else set()
    return LabelledEmbeddings(
        image_ids=[found[k][0] for k in keys],
        embeddings=np.stack([found[k][1] for k in keys]) if keys else np.empty((0, dim), dtype=np.float32),
        truth=np.array([[c in labels.labels[k] for c in categories] for k in keys], dtype=bool).reshape(len(keys), len(categories)),
        judged=np.array([[labels.is_judged(k, c) for c in categories] for k in keys],
                        dtype=bool).reshape(len(keys), len(categories)),
        heldout=np.array([is_heldout(found[k][0], heldout_fraction) for k in keys], dtype=bool),
        without_embeddings=sorted(set(labels.labels) - set(found)),
        unknown_categories=sorted(named - set(categories)),
    )


def tuning_sample(data: LabelledEmbeddings, shots: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the tuning half, and the positions among them of the images the corrections learn
    from: at most `shots` per category (all when None)."""
    tuning = np.flatnonzero(~data.heldout)
    return tuning, select_shots([data.image_ids[i] for i in tuning], data.truth[tuning], shots)


def fit_on_tuning_half(data: LabelledEmbeddings, centroids: CentroidSet, shots: int | None, version: str,
                       candidates=CANDIDATES) -> AdapterSet:
    """Adapters from the tuning half only: the held-out half never feeds a choice, a fit or a threshold.
    The corrections learn from at most `shots` images per category; thresholds are calibrated on the
    whole tuning half, as calibration's are."""
    rows, learn = tuning_sample(data, shots)
    return fit_adapters([data.image_ids[i] for i in rows], data.embeddings[rows], data.truth[rows], centroids, version,
                        candidates, learn, data.judged[rows])


def scored(data: LabelledEmbeddings, centroids: CentroidSet, adapters: AdapterSet | None = None) -> LabelledScores:
    """The labelled images' numbers as calibration reads them, zero-shot or through the adapters."""
    m = score_matrices(data.embeddings, centroids, adapters=adapters)
    gap = (m["pos"] - m["neutral"]).astype(np.float64)
    gap[:, ~centroids.has_neutral] = np.nan
    score = m["score"].astype(np.float64)
    if m["probability"] is not None:
        single = np.array([mode == SINGLE_LABEL for mode in centroids.modes])
        score[:, single] = m["probability"][:, single]
    return LabelledScores(
        image_ids=data.image_ids, paths=data.image_ids, categories=centroids.categories, modes=centroids.modes,
        score=score, neutral_gap=gap, matched=m["matched"], truth=data.truth,
        thresholds=m["thresholds"], neutral_margins=m["neutral_margins"], judged=data.judged,
    )


@dataclass
class AdapterComparison:
    categories: list[str]
    zero_shot: list[CategoryScore]
    calibrated: list[CategoryScore]
    adapted: list[CategoryScore]
    labels_per_category: np.ndarray  # images labelled with each category the adapters learnt from
    tuning_images: int  # the whole tuning half (what calibration tuned on)
    adapter_images: int  # the part of it the adapters learnt from
    heldout_images: int
    adapters: AdapterSet

    def table(self) -> str:
        lines = [
            f"held-out images: {self.heldout_images}; calibrated on the {self.tuning_images} tuning images, "
            f"adapters learnt from {self.adapter_images} of them (their thresholds calibrated on all {self.tuning_images})",
            f"{'category':<12} {'labels':>6}  {'zero-shot P/R/F1':>18}  {'calibrated P/R/F1':>18}  {'adapted P/R/F1':>18}",
        ]
        for j, name in enumerate(self.categories):
            cells = [f"{s.precision:.3f} {s.recall:.3f} {s.f1:.3f}" for s in
                     (self.zero_shot[j], self.calibrated[j], self.adapted[j])]
            lines.append(f"{name:<12} {int(self.labels_per_category[j]):>6}  {cells[0]:>18}  {cells[1]:>18}  {cells[2]:>18}")
        lines.append(f"macro F1 on held-out images: zero-shot {macro_f1(self.zero_shot):.3f}, "
                     f"calibrated {macro_f1(self.calibrated):.3f}, adapted {macro_f1(self.adapted):.3f}")
        for f in self.adapters.files:
            tried = ", ".join(f"{k} {v:.3f}" for k, v in f.cv_macro_f1.items()) or "nothing (too few labels)"
            lines.append(f"{f.source}: {f.description} (cross-validated macro F1 on the tuning images: {tried})")
        return "\n".join(lines)


def compare(data: LabelledEmbeddings, centroids: CentroidSet, shots: int | None, version: str = "evaluation",
            heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, candidates=CANDIDATES) -> AdapterComparison:
    if data.heldout.all() or not data.heldout.any():
        raise LabelsFileError(
            f"{len(data.image_ids)} labelled images with embeddings cannot be split into tuning and held-out "
            "parts; label more images.")
    zero_shot = scored(data, centroids)
    report = calibrate(zero_shot, heldout_fraction=heldout_fraction)
    adapters = fit_on_tuning_half(data, centroids, shots, version, candidates)
    adapted = scored(data, centroids, adapters)
    held = data.heldout
    rows, learn = tuning_sample(data, shots)
    return AdapterComparison(
        categories=centroids.categories,
        zero_shot=report.before,
        calibrated=report.after,
        adapted=category_scores(adapted.matched[held], data.truth[held], centroids.categories, data.judged[held]),
        labels_per_category=data.truth[rows[learn]].sum(0),
        tuning_images=int((~held).sum()),
        adapter_images=len(learn),
        heldout_images=int(held.sum()),
        adapters=adapters,
    )
