"""Classifying image embeddings against prompt centroids, as matrix products over chunks of images.

Two modes, chosen per prompt file:

- multi_label (the first seed's rule): score = pos_sim - neg_sim; matched when score >= threshold
  and pos_sim >= neutral_sim + neutral_margin. A category without negative descriptions has
  neg_sim 0; one without neutral descriptions skips the neutral condition (neutral_sim NULL).
  An image can match several categories or none.
- single_label (the third seed's zero-shot): softmax over the file's categories of
  logit_scale * cos(image, positive centroid); the `top_k` most probable categories whose
  probability reaches the threshold are matched, with their probability and rank.

Who decides each row (`decided_by`): the `rule` (the prompt files' thresholds on the similarities),
the `adapter` where a few-shot adapter corrects the category's similarities (clip_assets.tuning.adapters),
or a `person` where the review pages hold a yes or no for that image and category
(clip_assets.tuning.review_labels): a person's verdict sets `matched` whatever the scores say.
`model_matched` keeps what the rule or adapter decided, and `rule_matched` what the zero-shot rule
alone decides (they differ where the adapter changed the decision), so evaluation measures the model,
not the person, and the review pages can ask about disagreements.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clip_assets.classification.centroids import CentroidSet
from clip_assets.classification.prompts import SINGLE_LABEL
from clip_assets.storage.arrow_vectors import vectors_matrix
from clip_assets.storage.damaged_files import EMBEDDINGS, parquet_batches

DEFAULT_CHUNK_IMAGES = 8_192
NO_ADAPTER = "none"  # adapter_version of a zero-shot row  # (n, C) matrices of a chunk stay in cache
RULE, ADAPTER, PERSON = "rule", "adapter", "person"  # decided_by
DECIDERS = [RULE, ADAPTER, PERSON]


class ModelMismatchError(ValueError):
    """Embeddings and centroids come from different models: their similarities mean nothing."""


_LABEL = pa.dictionary(pa.int32(), pa.string())  # repeated strings stay small in memory

CLASSIFICATION_SCHEMA = pa.schema(
    [
        pa.field("batch", _LABEL, nullable=False),
        pa.field("image_id", _LABEL, nullable=False),
        pa.field("category", _LABEL, nullable=False),
        pa.field("mode", _LABEL, nullable=False),
        pa.field("pos_sim", pa.float32()),
        pa.field("neg_sim", pa.float32()),
        pa.field("neutral_sim", pa.float32()),
        pa.field("score", pa.float32()),
        pa.field("probability", pa.float32()),
        pa.field("rank", pa.int16()),
        pa.field("threshold", pa.float64()),
        pa.field("neutral_margin", pa.float64()),
        pa.field("matched", pa.bool_()),
        pa.field("model", _LABEL),
        pa.field("prompt_version", _LABEL),
        pa.field("adapter_version", _LABEL),
        pa.field("model_matched", pa.bool_()),
        pa.field("rule_matched", pa.bool_()),
        pa.field("decided_by", _LABEL),
    ]
)


def check_same_model(embedding_models: set[str], centroid_model: str) -> None:
    if embedding_models - {centroid_model}:
        raise ModelMismatchError(
            f"Embeddings were made by {sorted(embedding_models)} but the prompt centroids by "
            f"'{centroid_model}'. Similarities across models are meaningless, so nothing was "
            "classified. Re-materialize image_embeddings (for this batch) or prompt_centroids so "
            "both use the configured model."
        )


def models_in_file(embeddings_file: Path, rows_per_read: int = 65_536) -> set[str]:
    """The model identities an embeddings file holds, read a column slice at a time (a damaged file:
    DamagedFileError, naming the command that rebuilds it)."""
    models: set[str] = set()
    for record_batch in parquet_batches(embeddings_file, EMBEDDINGS, Path(embeddings_file).stem,
                                        batch_size=rows_per_read, columns=["model"]):
        models.update(pc.unique(record_batch.column("model")).to_pylist())
    return models


def single_label_groups(centroids: CentroidSet) -> list[np.ndarray]:
    """Category indices of each single_label prompt file: the sets a softmax runs over."""
    groups: dict[str, list[int]] = {}
    for i, (mode, source) in enumerate(zip(centroids.modes, centroids.sources)):
        if mode == SINGLE_LABEL:
            groups.setdefault(source, []).append(i)
    return [np.array(g) for g in groups.values()]


def centroid_columns(c: CentroidSet) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The distinct centroid vectors, and for each kind the column of each category among them."""
    stacked = np.concatenate([c.positive, c.negative, c.neutral]).astype(np.float32, copy=False)
    vectors, inverse = np.unique(stacked, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    k = len(c.categories)
    return vectors, {"positive": inverse[:k], "negative": inverse[k : 2 * k], "neutral": inverse[2 * k :]}


def score_matrices(
    embeddings: np.ndarray,
    c: CentroidSet,
    columns: tuple[np.ndarray, dict[str, np.ndarray]] | None = None,
    adapters=None,
) -> dict[str, np.ndarray | None]:
    """Every per-(image, category) number of both rules, as (n, C) arrays.

    `adapters` (a clip_assets.tuning.adapters.AdapterSet): its correction is added to the positive
    similarities and its thresholds and margins replace the centroids'. `probability` and `rank`
    are None when no prompt file is single_label. `rule_matched` is the zero-shot rule's decision
    (`matched` itself without adapters), `adapted` which categories the adapters correct.
    """
    if embeddings.shape[1:] != (c.dim,):
        raise ModelMismatchError(
            f"Embedding dimension {embeddings.shape[1:]} does not match centroid dimension {c.dim}."
        )
    multi = np.array([mode != SINGLE_LABEL for mode in c.modes])
    # One matrix product against the distinct centroid vectors: a neutral set shared by every
    # category of a file is multiplied once, not once per category.
    vectors, cols = columns or centroid_columns(c)
    sims = embeddings @ vectors.T
    pos = sims[:, cols["positive"]]
    # 0 where a category has no negatives; single_label categories never use them.
    uses_negative = c.has_negative & multi
    neg = sims[:, cols["negative"]] if uses_negative.any() else np.zeros_like(pos)
    if not uses_negative.all():
        neg[:, ~uses_negative] = 0
    neutral = sims[:, cols["neutral"]]
    thresholds, margins = c.thresholds, c.neutral_margins
    if adapters is None:
        m = apply_rules(pos, neg, neutral, c, thresholds, margins)
        return m | {"rule_matched": m["matched"], "adapted": np.zeros(len(c.categories), dtype=bool)}
    rule = apply_rules(pos, neg, neutral, c, thresholds, margins)["matched"]
    m = apply_rules(adapters.corrected_positive(embeddings, pos), neg, neutral, c, *adapters.settings(c))
    return m | {"rule_matched": rule, "adapted": adapters.adapted_columns(len(c.categories))}


def person_decides(m: dict[str, np.ndarray | None], image_ids: list[str], verdicts: dict[str, dict[int, bool]]) -> None:
    """Set `matched` where a person said yes or no (`verdicts`: image_id -> {category column: yes?}),
    in place; `model_matched` keeps the rule's or adapter's decision and `person` marks the cells."""
    m["model_matched"] = m["matched"]
    m["person"] = None
    hits = [(i, verdicts[image_id]) for i, image_id in enumerate(image_ids) if image_id in verdicts]
    if not hits:
        return
    matched, person = m["matched"].copy(), np.zeros(m["matched"].shape, dtype=bool)
    for i, said in hits:
        for j, yes in said.items():
            matched[i, j], person[i, j] = yes, True
    m["matched"], m["person"] = matched, person


def apply_rules(
    pos: np.ndarray, neg: np.ndarray, neutral: np.ndarray, c: CentroidSet, thresholds: np.ndarray, margins: np.ndarray
) -> dict[str, np.ndarray | None]:
    """Both rules on (n, C) similarities: multi_label's threshold and neutral margin, single_label's softmax."""
    n = pos.shape[0]
    score = pos - neg
    matched = score >= thresholds.astype(np.float32)
    if c.has_neutral.any():
        neutral_ok = pos >= neutral + margins.astype(np.float32)
        neutral_ok[:, ~c.has_neutral] = True
        matched &= neutral_ok
    groups = single_label_groups(c)
    probability = rank = None
    if groups:
        probability = np.full(pos.shape, np.nan, dtype=np.float32)
        rank = np.zeros(pos.shape, dtype=np.int16)
    for group in groups:
        logits = c.logit_scale * pos[:, group]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        probability[:, group] = p
        order = np.argsort(-p, axis=1, kind="stable")
        ranks = np.empty_like(order)
        ranks[np.arange(n)[:, None], order] = np.arange(1, len(group) + 1)
        rank[:, group] = ranks
        matched[:, group] = (ranks <= c.top_k[group]) & (p >= thresholds[group])
    return {"pos": pos, "neg": neg, "neutral": neutral, "score": score, "matched": matched,
            "probability": probability, "rank": rank, "thresholds": thresholds, "neutral_margins": margins}


def _repeated(value: str, count: int) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(count, dtype=np.int32)), pa.array([value]))


def _per_category(values: np.ndarray, n: int) -> np.ndarray:
    return np.tile(values, n)


def classify_batch(
    batch: str,
    image_ids: list[str] | pa.Array,
    embeddings: np.ndarray,
    centroids: CentroidSet,
    columns: tuple[np.ndarray, dict[str, np.ndarray]] | None = None,
    adapters=None,
    verdicts: dict[str, dict[int, bool]] | None = None,
) -> pa.Table:
    """One row per (image, category), images in input order, categories in centroid order.

    `adapters` (clip_assets.tuning.adapters.AdapterSet, or None for zero-shot): pos_sim, score, probability,
    threshold and neutral_margin are then the adapted ones, and adapter_version says which adapters.
    `verdicts`: a person's yes or no per image_id and category column, which `matched` follows.
    """
    m = score_matrices(embeddings, centroids, columns, adapters)
    ids = image_ids.to_pylist() if isinstance(image_ids, pa.Array) else list(image_ids)
    person_decides(m, ids if verdicts else [], verdicts or {})
    return classification_rows(batch, image_ids, m, centroids, adapters_version(adapters))


def adapters_version(adapters) -> str:
    """What the rows' adapter_version column says: the adapters' version, or NO_ADAPTER."""
    return NO_ADAPTER if adapters is None else adapters.version


def classification_rows(
    batch: str, image_ids: list[str] | pa.Array, m: dict[str, np.ndarray | None], centroids: CentroidSet,
    adapter_version: str = NO_ADAPTER,
) -> pa.Table:
    """The rows of `score_matrices`' numbers: one per (image, category), images in input order."""
    n, c = m["pos"].shape
    is_single = np.array([mode == SINGLE_LABEL for mode in centroids.modes])
    if m["probability"] is None:
        probability, rank = pa.nulls(n * c, pa.float32()), pa.nulls(n * c, pa.int16())
    else:
        multi = _per_category(~is_single, n)
        probability = pa.array(m["probability"].reshape(-1), pa.float32(), mask=multi)
        rank = pa.array(m["rank"].reshape(-1), pa.int16(), mask=multi)
    category_codes = _per_category(np.arange(c, dtype=np.int32), n)
    decided_by = _per_category(np.where(m.get("adapted", np.zeros(c, dtype=bool)), 1, 0).astype(np.int32), n)
    if m.get("person") is not None:
        decided_by = np.where(m["person"].reshape(-1), np.int32(2), decided_by)
    model_matched = m.get("model_matched", m["matched"])
    return pa.table(
        {
            "batch": _repeated(batch, n * c),
            "image_id": pa.DictionaryArray.from_arrays(
                pa.array(np.repeat(np.arange(n, dtype=np.int32), c)),
                image_ids if isinstance(image_ids, pa.Array) else pa.array(image_ids, pa.string()),
            ),
            "category": pa.DictionaryArray.from_arrays(category_codes, pa.array(centroids.categories)),
            "mode": pa.DictionaryArray.from_arrays(
                _per_category(is_single.astype(np.int32), n), pa.array(["multi_label", SINGLE_LABEL])
            ),
            "pos_sim": pa.array(m["pos"].reshape(-1)),
            "neg_sim": pa.array(m["neg"].reshape(-1)),
            "neutral_sim": pa.array(
                m["neutral"].reshape(-1), mask=_per_category(~centroids.has_neutral | is_single, n)
            ),
            "score": pa.array(m["score"].reshape(-1)),
            "probability": probability,
            "rank": rank,
            "threshold": pa.DictionaryArray.from_arrays(category_codes, pa.array(m["thresholds"])).cast(pa.float64()),
            "neutral_margin": pa.DictionaryArray.from_arrays(
                category_codes, pa.array(m["neutral_margins"])
            ).cast(pa.float64()),
            "matched": pa.array(m["matched"].reshape(-1)),
            "model": _repeated(centroids.model, n * c),
            "prompt_version": _repeated(centroids.prompt_version, n * c),
            "adapter_version": _repeated(adapter_version, n * c),
            "model_matched": pa.array(model_matched.reshape(-1)),
            "rule_matched": pa.array(m.get("rule_matched", model_matched).reshape(-1)),
            "decided_by": pa.DictionaryArray.from_arrays(decided_by, pa.array(DECIDERS)),
        },
        schema=CLASSIFICATION_SCHEMA,
    )


def classify_stream(
    batch: str,
    embedding_batches: Iterable[pa.RecordBatch],
    centroids: CentroidSet,
    on_scored: Callable[[pa.Array, dict[str, np.ndarray | None]], None] | None = None,
    adapters=None,
    verdicts: dict[str, dict[int, bool]] | None = None,
) -> Iterator[pa.RecordBatch]:
    """The rows of `classify_batch` for record batches of an embeddings file (`image_id`, `embedding`),
    one record batch at a time: memory holds one batch's matrices, never the file's.

    `on_scored(image_ids, matrices)` sees each record batch's numbers before its rows are yielded,
    so figures about the whole batch are gathered in the same pass (a person's verdicts applied:
    `verdicts`, image_id -> {category column: yes?}).
    """
    columns = centroid_columns(centroids)
    for record_batch in embedding_batches:
        if record_batch.num_rows == 0:
            continue
        ids = record_batch.column("image_id")
        m = score_matrices(vectors_matrix(record_batch.column("embedding")), centroids, columns, adapters)
        person_decides(m, ids.to_pylist() if verdicts else [], verdicts or {})
        if on_scored is not None:
            on_scored(ids, m)
        yield from classification_rows(batch, ids, m, centroids, adapters_version(adapters)).to_batches()
