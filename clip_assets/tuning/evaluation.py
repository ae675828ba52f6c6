"""Precision, recall and F1 of matched labels against labels a person (or a generator) assigned."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CategoryScore:
    category: str
    true_positives: int
    false_positives: int
    false_negatives: int

    @property
    def precision(self) -> float:
        d = self.true_positives + self.false_positives
        return self.true_positives / d if d else 0.0

    @property
    def recall(self) -> float:
        d = self.true_positives + self.false_negatives
        return self.true_positives / d if d else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def score_labels(
    predicted: dict[str, set[str]], truth: dict[str, set[str]], categories: list[str]
) -> list[CategoryScore]:
    """Per-category counts over the images in `truth`; an image missing from `predicted` matched nothing."""
    scores = []
    for category in categories:
        tp = fp = fn = 0
        for image, labels in truth.items():
            got = category in predicted.get(image, set())
            want = category in labels
            tp += got and want
            fp += got and not want
            fn += want and not got
        scores.append(CategoryScore(category, tp, fp, fn))
    return scores


def macro_f1(scores: list[CategoryScore]) -> float:
    return sum(s.f1 for s in scores) / len(scores) if scores else 0.0
