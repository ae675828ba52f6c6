"""The vectorised rule against the first seed's per-image loop, written out independently here."""

import numpy as np
import pyarrow as pa
import pytest

from clip_assets.classification.centroids import CentroidSet
from clip_assets.classification.rules import ModelMismatchError, check_same_model, classify_batch
from clip_assets_tests.support.chunked_classification import classify_in_chunks


def unit(rng, *shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_centroids(rng, dim=16, modes=("multi_label",) * 4, sources=("x.toml",) * 4, top_k=1):
    names = ["a", "b", "c", "d"]
    has_neg = np.array([True, False, True, False])
    has_neu = np.array([True, True, False, False])
    return CentroidSet(
        categories=names,
        sources=list(sources),
        thresholds=np.array([0.0, 0.1, -0.05, 0.2]),
        neutral_margins=np.array([0.01, 0.0, 0.3, 0.0]),
        positive=unit(rng, 4, dim),
        negative=unit(rng, 4, dim) * has_neg[:, None],
        neutral=unit(rng, 4, dim) * has_neu[:, None],
        has_negative=has_neg,
        has_neutral=has_neu,
        modes=list(modes),
        top_k=np.full(4, top_k),
        logit_scale=50.0,
        prompt_counts={},
        prompt_hashes={},
        model="m1",
        prompt_version="v1",
    )


def seed_loop(image_ids, embeddings, c):
    """The blog's loop: per image, per category, with the issue's rules for missing sets."""
    out = {}
    for image_id, emb in zip(image_ids, embeddings):
        for i, name in enumerate(c.categories):
            pos_sim = float(emb @ c.positive[i])
            neg_sim = float(emb @ c.negative[i]) if c.has_negative[i] else 0.0
            neutral_sim = float(emb @ c.neutral[i]) if c.has_neutral[i] else None
            score = pos_sim - neg_sim
            ok = score >= c.thresholds[i] and (neutral_sim is None or pos_sim >= neutral_sim + c.neutral_margins[i])
            out[(image_id, name)] = (pos_sim, neg_sim, neutral_sim, score, ok)
    return out


def test_matches_the_seed_loop_row_for_row():
    rng = np.random.default_rng(0)
    c = make_centroids(rng)
    emb = unit(rng, 300, 16)
    ids = [f"img{i}" for i in range(300)]
    table = classify_batch("b1", ids, emb, c)
    assert table.num_rows == 300 * 4
    expected = seed_loop(ids, emb, c)
    matched = 0
    for row in table.to_pylist():
        pos, neg, neu, score, ok = expected[(row["image_id"], row["category"])]
        assert row["pos_sim"] == pytest.approx(pos, abs=1e-5)
        assert row["neg_sim"] == pytest.approx(neg, abs=1e-5)
        assert (row["neutral_sim"] is None) == (neu is None)
        if neu is not None:
            assert row["neutral_sim"] == pytest.approx(neu, abs=1e-5)
        assert row["score"] == pytest.approx(score, abs=1e-5)
        assert row["matched"] == ok
        assert row["batch"] == "b1" and row["model"] == "m1" and row["prompt_version"] == "v1"
        matched += ok
    assert 0 < matched < table.num_rows  # the rule discriminates on this data


def test_missing_negatives_count_as_zero_and_missing_neutrals_are_null():
    rng = np.random.default_rng(1)
    c = make_centroids(rng)
    rows = classify_batch("b", ["x"], unit(rng, 1, 16), c).to_pylist()
    by_cat = {r["category"]: r for r in rows}
    assert by_cat["b"]["neg_sim"] == 0.0 and by_cat["d"]["neg_sim"] == 0.0
    assert by_cat["c"]["neutral_sim"] is None and by_cat["a"]["neutral_sim"] is not None


def test_models_must_agree():
    check_same_model({"m1"}, "m1")
    with pytest.raises(ModelMismatchError, match="m2.*m1"):
        check_same_model({"m2"}, "m1")
    with pytest.raises(ModelMismatchError, match="dimension"):
        classify_batch("b", ["x"], np.ones((1, 8), np.float32), make_centroids(np.random.default_rng(2)))


def test_single_label_is_a_softmax_over_each_files_categories():
    rng = np.random.default_rng(3)
    single = "single_label"
    c = make_centroids(
        rng, modes=("multi_label", single, single, single), sources=("m.toml", "s.toml", "s.toml", "s.toml"), top_k=2
    )
    c.thresholds[:] = [0.0, 0.2, 0.2, 0.2]  # single_label: minimum probability
    emb = unit(rng, 200, 16)
    table = classify_batch("b", [f"i{k}" for k in range(200)], emb, c)
    by = {(r["image_id"], r["category"]): r for r in table.to_pylist()}
    for k, e in enumerate(emb):
        logits = 50.0 * np.array([e @ c.positive[j] for j in (1, 2, 3)])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        order = list(np.argsort(-p))
        for j, name in zip((1, 2, 3), "bcd"):
            row = by[(f"i{k}", name)]
            assert row["mode"] == single and row["neutral_sim"] is None and row["neg_sim"] == 0.0
            assert row["probability"] == pytest.approx(p[j - 1], abs=1e-5)
            assert row["rank"] == order.index(j - 1) + 1
            assert row["matched"] == (row["rank"] <= 2 and p[j - 1] >= 0.2)
        multi = by[(f"i{k}", "a")]
        assert multi["mode"] == "multi_label" and multi["probability"] is None and multi["rank"] is None
    probs = [sum(by[(f"i{k}", n)]["probability"] for n in "bcd") for k in range(200)]
    np.testing.assert_allclose(probs, 1.0, atol=1e-5)
    top1 = sum(by[(f"i{k}", n)]["rank"] == 1 and by[(f"i{k}", n)]["matched"] for k in range(200) for n in "bcd")
    assert 0 < top1 <= 200


def test_chunks_give_the_same_rows_as_one_pass():
    rng = np.random.default_rng(4)
    c = make_centroids(rng)
    emb = unit(rng, 1001, 16)
    ids = [f"i{k}" for k in range(1001)]
    whole = classify_batch("b", ids, emb, c)
    chunked = pa.concat_tables(classify_in_chunks("b", ids, emb, c, chunk_images=100))
    for name in whole.column_names:
        if pa.types.is_floating(whole.schema.field(name).type):  # BLAS may round the last bit differently
            np.testing.assert_allclose(
                chunked[name].to_numpy(zero_copy_only=False), whole[name].to_numpy(zero_copy_only=False), atol=1e-6
            )
        else:
            assert chunked[name].to_pylist() == whole[name].to_pylist(), name
