"""Few-shot adapters: a correction of the zero-shot scores learnt from labelled images' stored embeddings.

Nothing is re-encoded and the image encoder is never touched. Per prompt file, one of three adapters
is chosen on labelled images:

- `none`: the zero-shot scores as they are;
- `cache` (training-free, in the style of Tip-Adapter, Zhang et al. 2022): the labelled images'
  normalised embeddings are the keys, their labels the values; an image's affinity to each key is
  exp(-beta * (1 - cos)), and alpha * affinities @ values is added to its positive similarity. For a
  multi_label category the values are +1 (labelled with it) and -1 (not): Tip-Adapter's one-hot
  values for the two classes "is c" / "is not c", taken as the difference of their two logits. For a
  single_label file they are one-hot over the file's categories, as in Tip-Adapter;
- `head`: a linear head whose rows start at the positive text centroids (so with no labels it is
  exactly zero-shot), trained with a weight decay that pulls it back toward that start: binary
  cross-entropy per category (multi_label) or cross-entropy over the file's softmax (single_label).

How it combines with the threshold rule: the adapter corrects the **positive similarity** only. For a
multi_label category, score = pos' - neg_sim and the neutral condition is pos' >= neutral_sim +
margin, as before; the threshold and neutral margin are then calibrated on the adapted scores (with
`clip_assets.tuning.calibration.choose_threshold`). For a single_label file the softmax runs over the
corrected similarities and the file's threshold and top_k are kept.

The choice between the three and their hyper-parameters is made by cross-validation inside the
images given (the caller passes the tuning half of calibration's image-id split only, and may name
the part of it the correction learns from, e.g. at most 16 images per category): each candidate is
fitted on all folds but one and scores the images of that fold; thresholds are tuned on the
out-of-fold scores of the other folds and judged on the fold. The candidate with the best macro F1 of
the file's categories is fitted on the images it learns from (at most MAX_FIT_IMAGES, sampled so that
a rare category keeps its labelled images). Its thresholds are then tuned on every image given, as
calibration's are: out-of-fold scores for the images it was fitted on, scores through the fitted
correction for the others (neither kind was fitted on, as the images it will classify are not).

The module stays whole (a little over 400 lines): fitting, cross-validated choice and threshold
tuning share the fold assignment and the fitted heads, and split apart they would pass those around.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from clip_assets.classification.centroids import CentroidSet
from clip_assets.classification.prompts import SINGLE_LABEL
from clip_assets.classification.rules import score_matrices
from clip_assets.tuning.calibration import choose_threshold, predict, stable_fraction

NONE, CACHE, HEAD = "none", "cache", "head"
FOLDS = 5
# Scale-free grids: beta in units of 1 / (median 1 - cos between keys); alpha in units of
# std(zero-shot score) / std(cache term), per category.
CACHE_BETAS = (1.0, 3.0, 10.0, 30.0)
CACHE_ALPHAS = (0.25, 0.5, 1.0, 2.0, 4.0)
HEAD_DECAYS = (0.001, 0.01, 0.1)
HEAD_ITERATIONS = 100
MAX_CACHE_KEYS = 4096  # more labelled images than this: the cache keeps this many (by image-id hash)
MAX_SELECTION_IMAGES = 4096  # cross-validation runs on at most this many images
# The chosen adapter is fitted, and its thresholds tuned, on at most this many: a head has 512 weights
# a category, and the LBFGS fit on 100k images took most of a minute for no measurable gain.
MAX_FIT_IMAGES = 16384


def by_hash(image_ids: list[str], salt: str) -> np.ndarray:
    """Indices of `image_ids` in a stable pseudo-random order."""
    return np.argsort([stable_fraction(i, salt) for i in image_ids], kind="stable")


def stratified_sample(image_ids: list[str], truth: np.ndarray, cap: int, salt: str) -> np.ndarray:
    """Indices of at most `cap` images in a stable order, keeping a rare category's labelled images.

    First, images labelled with a category that has fewer than cap / (2 x categories) in the sample
    so far; then the rest in hash order until the cap. Every image when there are no more than cap."""
    if len(image_ids) <= cap:
        return np.arange(len(image_ids))
    order = by_hash(image_ids, salt)
    quota = max(1, cap // (2 * max(truth.shape[1], 1)))
    counts = np.zeros(truth.shape[1], dtype=int)
    chosen = np.zeros(len(image_ids), dtype=bool)
    taken = 0
    for i in order:
        positives = truth[i]
        if positives.any() and (counts[positives] < quota).any():
            counts[positives] += 1
            chosen[i] = True
            taken += 1
            if taken >= cap // 2:
                break
    rest = order[~chosen[order]][: cap - taken]
    chosen[rest] = True
    return np.flatnonzero(chosen)


def select_shots(image_ids: list[str], truth: np.ndarray, shots: int | None) -> np.ndarray:
    """Indices of a sample with at most `shots` images labelled with each category (and at most
    `shots` labelled with none), taken in a stable order; None: every image."""
    if not shots:
        return np.arange(len(image_ids))
    counts = np.zeros(truth.shape[1], dtype=int)
    unlabelled = 0
    chosen = []
    for i in by_hash(image_ids, "shots"):
        positives = truth[i]
        if positives.any():
            if (counts[positives] < shots).all():
                counts[positives] += 1
                chosen.append(i)
        elif unlabelled < shots:
            unlabelled += 1
            chosen.append(i)
    return np.sort(np.array(chosen, dtype=int))


@dataclass(frozen=True)
class Candidate:
    kind: str
    beta: float = 0.0  # cache: in units of 1 / median key distance
    alpha: float = 0.0  # cache: in units of std(score) / std(cache term)
    decay: float = 0.0  # head

    def describe(self) -> str:
        if self.kind == CACHE:
            return f"cache (beta x{self.beta:g}, alpha x{self.alpha:g})"
        if self.kind == HEAD:
            return f"head (decay {self.decay:g})"
        return NONE


NONE_CANDIDATE = Candidate(NONE)
CANDIDATES = (
    [NONE_CANDIDATE]
    + [Candidate(CACHE, beta=b, alpha=a) for b in CACHE_BETAS for a in CACHE_ALPHAS]
    + [Candidate(HEAD, decay=d) for d in HEAD_DECAYS]
)


@dataclass
class GroupScores:
    """One prompt file's zero-shot numbers for a set of images, as (n, g) arrays, and which of the
    images' labels are judged (a person who judged an image on some categories only says nothing of
    the others: those cells teach nothing and are scored on nothing)."""

    pos: np.ndarray
    neg: np.ndarray
    neutral: np.ndarray  # NaN columns where a category has no neutral descriptions
    judged: np.ndarray | None = None  # bool; None: every cell

    def __post_init__(self):
        if self.judged is None:
            self.judged = np.ones(self.pos.shape, dtype=bool)


@dataclass
class FileAdapter:
    """The adapter of one prompt file: which kind, its parameters, and thresholds on adapted scores."""

    source: str
    mode: str
    columns: np.ndarray  # the file's categories' positions in the centroid set
    kind: str
    thresholds: np.ndarray  # (g,) multi_label: calibrated on adapted scores; single_label: the file's
    neutral_margins: np.ndarray  # (g,)
    description: str = NONE
    cv_macro_f1: dict[str, float] = field(default_factory=dict)  # best of each kind, cross-validated
    keys: np.ndarray | None = None  # cache: (N, d)
    values: np.ndarray | None = None  # cache: (N, g)
    beta: float = 0.0  # cache, absolute
    alpha: np.ndarray | None = None  # cache, absolute, (g,)
    weight_change: np.ndarray | None = None  # head: (g, d), trained rows minus the text centroids
    applies: np.ndarray | None = None  # (g,) bool: multi_label categories whose cross-validated F1 the correction raised
    labels_used: np.ndarray | None = None  # (g,) images labelled with each category that it learnt from
    images_used: int = 0  # images the correction learnt from
    calibration_images: int = 0  # images its thresholds were calibrated on (those and the rest of the tuning half)

    def positive_correction(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, g): what the adapter adds to the positive similarities of these images."""
        n, g = len(embeddings), len(self.columns)
        if self.kind == CACHE:
            correction = cache_term(embeddings, self.keys, self.values, self.beta) * self.alpha
        elif self.kind == HEAD:
            correction = embeddings @ self.weight_change.T
        else:
            return np.zeros((n, g), dtype=np.float32)
        return correction if self.applies is None else correction * self.applies


def cache_term(embeddings: np.ndarray, keys: np.ndarray, values: np.ndarray, beta: float,
               chunk: int = 8192) -> np.ndarray:
    """exp(-beta * (1 - cos)) @ values, a chunk of images at a time."""
    out = np.empty((len(embeddings), values.shape[1]), dtype=np.float32)
    for start in range(0, len(embeddings), chunk):
        affinity = np.exp(-beta * (1.0 - embeddings[start:start + chunk] @ keys.T))
        out[start:start + chunk] = affinity @ values
    return out


def cache_values(truth: np.ndarray, mode: str, judged: np.ndarray | None = None) -> np.ndarray:
    """+1/-1 per category (multi_label; 0 where not judged), or the labels one-hot over the file (single_label)."""
    if mode == SINGLE_LABEL:
        return truth.astype(np.float32)
    values = np.where(truth, 1.0, -1.0)
    return (values if judged is None else values * judged).astype(np.float32)


def median_key_distance(keys: np.ndarray, sample: int = 512) -> float:
    k = keys[:sample]
    d = 1.0 - k @ k.T
    off = d[~np.eye(len(k), dtype=bool)]
    m = float(np.median(off)) if off.size else 0.0
    return m if m > 1e-6 else 1e-6


def fit_head(embeddings: np.ndarray, scores: GroupScores, truth: np.ndarray, start: np.ndarray, mode: str,
             logit_scale: float, decay: float) -> np.ndarray:
    """Rows W trained from the text centroids `start`; returns W - start (zero when nothing is learnt)."""
    x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    w0 = torch.from_numpy(np.ascontiguousarray(start, dtype=np.float32))
    y = torch.from_numpy(truth.astype(np.float32))
    w = torch.from_numpy(scores.judged.astype(np.float32))  # cells not judged weigh nothing
    delta = torch.zeros_like(w0, requires_grad=True)
    params = [delta]
    if mode == SINGLE_LABEL:
        keep = y.sum(1) > 0  # images labelled with none of the file's categories teach it nothing
        x, y = x[keep], y[keep] / y[keep].sum(1, keepdim=True).clamp(min=1)
        base = None
    else:
        neg = torch.from_numpy(np.ascontiguousarray(scores.neg, dtype=np.float32))
        pos = torch.from_numpy(np.ascontiguousarray(scores.pos, dtype=np.float32))
        base = pos - neg
        # A free offset per category (thresholds are calibrated afterwards), started at the midpoint.
        yes, no = y * w, (1 - y) * w
        bias = ((base * yes).sum(0) / yes.sum(0).clamp(min=1) + (base * no).sum(0) / no.sum(0).clamp(min=1)) / 2
        bias = bias.detach().clone().requires_grad_(True)
        pos_weight = (no.sum(0) / yes.sum(0).clamp(min=1)).clamp(max=100)
        params.append(bias)
    if len(x) == 0 or (mode != SINGLE_LABEL and not y.any()):
        return np.zeros_like(start, dtype=np.float32)
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=HEAD_ITERATIONS, line_search_fn="strong_wolfe")

    def loss_fn():
        optimizer.zero_grad()
        if mode == SINGLE_LABEL:
            logits = logit_scale * (x @ (w0 + delta).T)
            loss = -(y * torch.log_softmax(logits, dim=1)).sum(1).mean()
        else:
            logits = logit_scale * (base + x @ delta.T - bias)
            # the mean over the judged cells (over every cell when all are judged)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, y, weight=w, pos_weight=pos_weight) * (w.numel() / w.sum().clamp(min=1))
        loss = loss + decay * (delta**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(loss_fn)
    return delta.detach().numpy().astype(np.float32)


def _fit_candidate(candidate: Candidate, embeddings: np.ndarray, scores: GroupScores, truth: np.ndarray,
                   start: np.ndarray, mode: str, logit_scale: float, shell: FileAdapter) -> FileAdapter:
    """`shell` with the candidate's parameters fitted on these images (thresholds untouched)."""
    a = FileAdapter(shell.source, mode, shell.columns, candidate.kind, shell.thresholds, shell.neutral_margins,
                    candidate.describe())
    if candidate.kind == CACHE:
        keep = np.sort(by_hash([str(i) for i in range(len(embeddings))], "keys")[:MAX_CACHE_KEYS])
        a.keys = np.ascontiguousarray(embeddings[keep], dtype=np.float32)
        a.values = cache_values(truth[keep], mode, scores.judged[keep])
        a.beta = candidate.beta / median_key_distance(a.keys)
        raw = cache_term(embeddings, a.keys, a.values, a.beta)
        zero_shot = scores.pos - (0 if mode == SINGLE_LABEL else scores.neg)
        spread = raw.std(axis=0)
        a.alpha = (candidate.alpha * zero_shot.std(axis=0) / np.where(spread > 1e-12, spread, np.inf)).astype(np.float32)
    elif candidate.kind == HEAD:
        a.weight_change = fit_head(embeddings, scores, truth, start, mode, logit_scale, candidate.decay)
    return a


def group_predictions(mode: str, pos: np.ndarray, scores: GroupScores, thresholds: np.ndarray,
                      margins: np.ndarray, top_k: np.ndarray, logit_scale: float) -> np.ndarray:
    """Matched flags of one prompt file's categories from (corrected) positive similarities."""
    if mode == SINGLE_LABEL:
        logits = logit_scale * pos
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        ranks = np.argsort(np.argsort(-p, axis=1, kind="stable"), axis=1) + 1
        return (ranks <= top_k) & (p >= thresholds)
    out = np.zeros(pos.shape, dtype=bool)
    for j in range(pos.shape[1]):
        out[:, j] = predict(pos[:, j] - scores.neg[:, j], pos[:, j] - scores.neutral[:, j], thresholds[j], margins[j])
    return out


def tuned_thresholds(mode: str, pos: np.ndarray, scores: GroupScores, truth: np.ndarray, thresholds: np.ndarray,
                     margins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """multi_label: per category, threshold and margin with the best F1 on these (adapted) scores."""
    t, m = thresholds.copy(), margins.copy()
    if mode == SINGLE_LABEL:
        return t, m
    for j in range(pos.shape[1]):
        rows = scores.judged[:, j]
        if truth[rows, j].any():
            choice = choose_threshold(pos[rows, j] - scores.neg[rows, j], pos[rows, j] - scores.neutral[rows, j],
                                      truth[rows, j], margins[j])
            t[j], m[j] = choice.threshold, choice.neutral_margin
    return t, m


def f1_per_column(predicted: np.ndarray, truth: np.ndarray, judged: np.ndarray | None = None) -> np.ndarray:
    if judged is not None:
        predicted, truth = predicted & judged, truth & judged
    tp = (predicted & truth).sum(0)
    fp = (predicted & ~truth).sum(0)
    fn = (~predicted & truth).sum(0)
    return np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)


@dataclass
class _Group:
    source: str
    mode: str
    columns: np.ndarray
    start: np.ndarray
    thresholds: np.ndarray
    margins: np.ndarray
    top_k: np.ndarray


def prompt_file_groups(c: CentroidSet) -> list[_Group]:
    groups: dict[str, list[int]] = {}
    for i, source in enumerate(c.sources):
        groups.setdefault(source, []).append(i)
    return [
        _Group(source, c.modes[cols[0]], np.array(cols), c.positive[cols], c.thresholds[cols].copy(),
               c.neutral_margins[cols].copy(), c.top_k[cols])
        for source, cols in groups.items()
    ]


def group_scores(matrices: dict, columns: np.ndarray, has_neutral: np.ndarray,
                 judged: np.ndarray | None = None) -> GroupScores:
    neutral = matrices["neutral"][:, columns].astype(np.float64)
    neutral[:, ~has_neutral[columns]] = np.nan
    return GroupScores(matrices["pos"][:, columns].astype(np.float64), matrices["neg"][:, columns].astype(np.float64),
                       neutral, None if judged is None else judged[:, columns])


def _subset(s: GroupScores, rows: np.ndarray) -> GroupScores:
    return GroupScores(s.pos[rows], s.neg[rows], s.neutral[rows], s.judged[rows])


def _out_of_fold(candidate: Candidate, g: _Group, x: np.ndarray, s: GroupScores, truth: np.ndarray,
                 folds: np.ndarray, logit_scale: float, shell: FileAdapter, memo: dict | None = None) -> np.ndarray:
    """Corrected positive similarities of every image, each from the candidate fitted without its fold.

    `memo`: cache corrections of one fold and beta, kept at alpha 1, so every alpha reuses them."""
    pos = s.pos.copy()
    if candidate.kind == NONE:
        return pos
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        key = (f, candidate.beta)
        if candidate.kind == CACHE and memo is not None and key in memo:
            pos[test] += candidate.alpha * memo[key]
            continue
        fit = Candidate(CACHE, beta=candidate.beta, alpha=1.0) if candidate.kind == CACHE else candidate
        fitted = _fit_candidate(fit, x[train], _subset(s, train), truth[train], g.start, g.mode, logit_scale, shell)
        correction = fitted.positive_correction(x[test])
        if candidate.kind == CACHE and memo is not None:
            memo[key] = correction
        pos[test] += (candidate.alpha if candidate.kind == CACHE else 1.0) * correction
    return pos


def _cross_validated_f1(g: _Group, pos: np.ndarray, s: GroupScores, truth: np.ndarray, folds: np.ndarray,
                        logit_scale: float) -> np.ndarray:
    """F1 per category of the file: per fold, thresholds tuned on the other folds' scores."""
    predicted = np.zeros(truth.shape, dtype=bool)
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        t, m = tuned_thresholds(g.mode, pos[train], _subset(s, train), truth[train], g.thresholds, g.margins)
        predicted[test] = group_predictions(g.mode, pos[test], _subset(s, test), t, m, g.top_k, logit_scale)
    return f1_per_column(predicted, truth, s.judged)


def fit_file_adapter(g: _Group, image_ids: list[str], x: np.ndarray, s: GroupScores, truth: np.ndarray,
                     logit_scale: float, candidates=CANDIDATES, learn: np.ndarray | None = None) -> FileAdapter:
    """Choose by cross-validation on the `learn` rows (default: every row), fit the choice on them, then
    calibrate thresholds on every row: a row the correction was fitted on gives its out-of-fold score,
    any other its score through the fitted correction."""
    shell = FileAdapter(g.source, g.mode, g.columns, NONE, g.thresholds, g.margins)
    learn = np.arange(len(image_ids)) if learn is None else np.asarray(learn, dtype=int)
    learn_ids = [image_ids[i] for i in learn]
    shell.labels_used, shell.images_used = truth[learn].sum(0), len(learn)
    if len(learn) < 2 * FOLDS or not truth[learn].any():
        # Too few labels to choose a correction: zero-shot scores, thresholds calibrated as calibration's are.
        shell.thresholds, shell.neutral_margins = tuned_thresholds(g.mode, s.pos, s, truth, g.thresholds, g.margins)
        shell.calibration_images = len(image_ids)
        return shell
    select = learn[stratified_sample(learn_ids, truth[learn], MAX_SELECTION_IMAGES, "selection")]
    xs, ss, ts = x[select], _subset(s, select), truth[select]
    folds = np.array([int(stable_fraction(image_ids[i], "fold") * FOLDS) for i in select])
    best, best_f1, per_kind, columns_f1, memo = None, -1.0, {}, {}, {}
    for candidate in candidates:
        oof = _out_of_fold(candidate, g, xs, ss, ts, folds, logit_scale, shell, memo)
        columns_f1[candidate] = _cross_validated_f1(g, oof, ss, ts, folds, logit_scale)
        f1 = float(columns_f1[candidate].mean())
        per_kind[candidate.kind] = max(per_kind.get(candidate.kind, -1.0), f1)
        if f1 > best_f1:
            best, best_f1 = candidate, f1
    fit = learn[stratified_sample(learn_ids, truth[learn], MAX_FIT_IMAGES, "fit")]
    fit_ids = [image_ids[i] for i in fit]
    fitted = _fit_candidate(best, x[fit], _subset(s, fit), truth[fit], g.start, g.mode, logit_scale, shell)
    if g.mode != SINGLE_LABEL and best.kind != NONE and NONE_CANDIDATE in columns_f1:
        # Categories are independent under the multi_label rule: one the correction did not help keeps zero-shot.
        fitted.applies = (columns_f1[best] > columns_f1[NONE_CANDIDATE]).astype(np.float32)
    pos = s.pos.copy()
    rest = np.setdiff1d(np.arange(len(image_ids)), fit)  # rows the correction was not fitted on
    pos[rest] += fitted.positive_correction(x[rest])
    fit_folds = np.array([int(stable_fraction(i, "fold") * FOLDS) for i in fit_ids])
    oof = _out_of_fold(best, g, x[fit], _subset(s, fit), truth[fit], fit_folds, logit_scale, shell)
    pos[fit] = oof if fitted.applies is None else np.where(fitted.applies > 0, oof, s.pos[fit])
    fitted.thresholds, fitted.neutral_margins = tuned_thresholds(g.mode, pos, s, truth, g.thresholds, g.margins)
    fitted.cv_macro_f1 = {k: round(v, 4) for k, v in per_kind.items()}
    fitted.labels_used, fitted.images_used = truth[fit].sum(0), len(fit)
    fitted.calibration_images = len(image_ids)
    return fitted


@dataclass
class AdapterSet:
    """Every prompt file's adapter, for one set of centroids."""

    files: list[FileAdapter]
    model: str
    prompt_version: str
    version: str  # what classification rows record

    @property
    def adapts(self) -> bool:
        return any(f.kind != NONE for f in self.files)

    def corrected_positive(self, embeddings: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Positive similarities with each file's correction added (the same array where none adapts)."""
        if not self.adapts:
            return pos
        out = pos.copy()
        for f in self.files:
            if f.kind != NONE:
                out[:, f.columns] += f.positive_correction(embeddings).astype(out.dtype)
        return out

    def adapted_columns(self, categories: int) -> np.ndarray:
        """(C,) bool: the categories whose similarities a correction changes (the rest follow the rule)."""
        out = np.zeros(categories, dtype=bool)
        for f in self.files:
            if f.kind != NONE:
                out[f.columns] = True if f.applies is None else np.asarray(f.applies) > 0
        return out

    def settings(self, centroids: CentroidSet) -> tuple[np.ndarray, np.ndarray]:
        """Thresholds and neutral margins per category: each file's adapter's."""
        t, m = centroids.thresholds.copy(), centroids.neutral_margins.copy()
        for f in self.files:
            t[f.columns], m[f.columns] = f.thresholds, f.neutral_margins
        return t, m


def fit_adapters(image_ids: list[str], embeddings: np.ndarray, truth: np.ndarray, centroids: CentroidSet,
                 version: str, candidates=CANDIDATES, learn: np.ndarray | None = None,
                 judged: np.ndarray | None = None) -> AdapterSet:
    """One adapter per prompt file from these labelled images (pass the tuning half only): the correction
    learns from the `learn` rows (default: all), thresholds are calibrated on all. `judged`: the
    (image, category) cells the labels judge (default: every one)."""
    matrices = score_matrices(np.ascontiguousarray(embeddings, dtype=np.float32), centroids)
    files = []
    for g in prompt_file_groups(centroids):
        s = group_scores(matrices, g.columns, centroids.has_neutral, judged)
        files.append(fit_file_adapter(g, image_ids, embeddings, s, truth[:, g.columns], centroids.logit_scale,
                                      candidates, learn))
    return AdapterSet(files, centroids.model, centroids.prompt_version, version)
