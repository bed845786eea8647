"""F1 for multi-label answers: a reference and a prediction are each a set of labels, the comma-separated parts of
the text, each `normalise`d (lower-case, whitespace folded, a trailing `.` dropped); empty parts are ignored.

`f1_micro` counts true positives, false positives and false negatives over every item and label, then takes F1 of
the totals. `f1_macro` takes each label's F1 from its own counts and averages over the labels that occur in the
references or the predictions (a label never right scores 0). F1 with nothing to count is 0."""

from __future__ import annotations

import collections
from typing import Sequence

from af2_jax.metrics.exact import normalise


def labels(text: str) -> set[str]:
    return {part for part in (normalise(piece) for piece in str(text).split(",")) if part}


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def _counts(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[int]]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])  # label -> tp, fp, fn
    for prediction, reference in zip(predictions, references):
        said, wanted = labels(prediction), labels(reference)
        for label in said & wanted:
            counts[label][0] += 1
        for label in said - wanted:
            counts[label][1] += 1
        for label in wanted - said:
            counts[label][2] += 1
    return counts


def f1_micro(predictions: Sequence[str], references: Sequence[str]) -> float:
    counts = _counts(predictions, references).values()
    return _f1(*(sum(c[i] for c in counts) for i in range(3)))


def f1_macro(predictions: Sequence[str], references: Sequence[str]) -> float:
    counts = _counts(predictions, references)
    return sum(_f1(*c) for c in counts.values()) / len(counts) if counts else 0.0
