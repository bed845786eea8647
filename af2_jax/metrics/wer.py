"""Word error rate over a corpus, through `jiwer`: the word-level edit distance (substitutions, deletions,
insertions) summed over every item, divided by the number of reference words. Both sides are `normalise`d first
(lower-case, whitespace folded, one trailing period dropped), so case and a final period are not errors; other
punctuation is compared as written."""

from __future__ import annotations

from typing import Sequence

from af2_jax.metrics.exact import normalise


def wer(predictions: Sequence[str], references: Sequence[str]) -> float:
    import jiwer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    references = [normalise(r) for r in references]
    if not any(references):
        raise ValueError("WER needs reference words; every reference is empty")
    return float(jiwer.wer(references, [normalise(p) for p in predictions]))
