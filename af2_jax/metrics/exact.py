"""Exact match: an answer is right when, normalised, it equals the reference normalised.

Normalisation: lower-case, every run of whitespace folded to one space, surrounding whitespace stripped, then one
trailing `.` dropped and whitespace stripped again ("A dog barking." and "a dog  barking" match). AF2's answers to
classification questions are short labels, so this is also single-label `accuracy`. The same function normalises
the answers of training's end-of-run exact match. The original computes no metric itself and lower-cases its
references (docs/original.md#evaluation); this rule is ours."""

from __future__ import annotations

from typing import Sequence


def normalise(text: str) -> str:
    folded = " ".join(str(text).lower().split())
    return folded[:-1].strip() if folded.endswith(".") else folded


def is_exact(prediction: str, reference: str) -> bool:
    return normalise(prediction) == normalise(reference)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The fraction of predictions equal to their reference after `normalise` (0.0 for none)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return 0.0
    return sum(is_exact(p, r) for p, r in zip(predictions, references)) / len(predictions)


accuracy = exact_match  # single-label classification sets: the same comparison
