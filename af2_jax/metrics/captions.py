"""Captioning metrics as the COCO caption evaluation computes them (pycocoevalcap, which the audio captioning
benchmarks AudioCaps and Clotho use), written by us: BLEU-4, ROUGE-L and CIDEr-D over tokenised captions.

Every function takes `predictions` (one caption per clip) and `references` (a list of captions per clip), each
caption already tokenised: words joined by single spaces (`tokenize`).

- `bleu_4`: corpus BLEU. Per clip, n-gram matches are clipped by the largest count in any one reference; matches,
  n-gram counts and lengths are summed over the corpus; the reference length per clip is the one closest to the
  prediction's (ties: the shorter). The score is the geometric mean of the four precisions times the brevity
  penalty exp(1 - reference / prediction length) when the prediction is shorter. COCO's smoothing is kept:
  precisions are (matches + 1e-15) / (n-grams + 1e-9).
- `rouge_l`: per clip, the longest common subsequence with each reference gives a precision (over the prediction's
  words) and a recall (over the reference's); the largest of each makes an F-measure with beta 1.2; the mean over
  clips.
- `cider_d`: n-grams of 1 to 4 words weighted by tf-idf, the document frequency counted over the clips' reference
  sets; per n, the cosine-like similarity of the prediction and each reference, with the prediction's weights
  clipped at the reference's, times a Gaussian penalty on the length difference (sigma 6; lengths counted in
  bigrams, as pycocoevalcap counts them); averaged over n and the references, times 10; the mean over clips.
- `meteor`: METEOR 1.5 run by pycocoevalcap's own jar (`java` needed; `meteor_available`), as the COCO evaluation
  runs it: English, normalised, one aggregate over the corpus.

SPICE and SPIDEr (the mean of CIDEr-D and SPICE) are not computed: SPICE needs the Stanford CoreNLP 3.6.0 models,
which pycocoevalcap downloads from nlp.stanford.edu on first use; `UNAVAILABLE` says so in results.
"""

from __future__ import annotations

import collections
import math
import re
import shutil
from typing import Sequence

import numpy as np

MAX_N = 4
ROUGE_BETA = 1.2
CIDER_SIGMA = 6.0
# Words as PTB tokenises them, for the Python rule: "don't" -> "do n't", "it's" -> "it 's".
_WORD = re.compile(r"[a-z0-9]+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|[a-z0-9]+")


def tokenizer_name() -> str:
    """Which tokeniser `tokenize` uses here (results record it): the PTB tokenizer of pycocoevalcap (Stanford
    CoreNLP, needs `java`) or, without it, our Python rule."""
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer  # noqa: F401
    except ImportError:
        return "python"
    return "ptb" if shutil.which("java") else "python"


def meteor_available() -> bool:
    return tokenizer_name() == "ptb"  # the same two needs: pycocoevalcap and java


UNAVAILABLE = {
    "spice": "SPICE needs the Stanford CoreNLP 3.6.0 models, which pycocoevalcap downloads from nlp.stanford.edu on "
             "first use; they are not bundled, and this evaluation runs offline",
    "spider": "SPIDEr is the mean of CIDEr-D and SPICE, and SPICE is unavailable offline",
}
METEOR_UNAVAILABLE = "METEOR runs pycocoevalcap's jar, which needs `java` on the PATH (and the eval extra)"


def tokenize(captions: Sequence[str]) -> list[str]:
    """Captions as lower-case words joined by single spaces, punctuation removed: with pycocoevalcap's PTB tokenizer
    when `tokenizer_name()` is "ptb", else by the Python rule: lower-case runs of letters and digits, with the
    clitics PTB splits off ("it 's", "do n't", "they 're") as words of their own, everything else dropped."""
    if tokenizer_name() == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        done = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
        return [done[i][0] for i in range(len(captions))]
    words = (_WORD.findall(str(c).lower()) for c in captions)
    return [" ".join(w) for w in words]


def _ngrams(words: list[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _check(predictions, references) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference")


def bleu_4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    _check(predictions, references)
    matches, counts = np.zeros(MAX_N), np.zeros(MAX_N)
    test_length = ref_length = 0
    for prediction, refs in zip(predictions, references):
        words = prediction.split()
        ref_words = [r.split() for r in refs]
        test_length += len(words)
        ref_length += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for n in range(1, MAX_N + 1):
            most = collections.Counter()
            for r in ref_words:
                most |= _ngrams(r, n)  # the largest count of each n-gram in any one reference
            found = _ngrams(words, n)
            matches[n - 1] += sum(min(count, most[gram]) for gram, count in found.items())
            counts[n - 1] += max(len(words) - n + 1, 0)
    precisions = (matches + 1e-15) / (counts + 1e-9)
    score = float(np.prod(precisions) ** (1 / MAX_N))
    ratio = (test_length + 1e-15) / (ref_length + 1e-9)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


def _lcs(a: list[str], b: list[str]) -> int:
    table = np.zeros((len(a) + 1, len(b) + 1), np.int64)
    for i, x in enumerate(a, 1):
        for j, y in enumerate(b, 1):
            table[i, j] = table[i - 1, j - 1] + 1 if x == y else max(table[i - 1, j], table[i, j - 1])
    return int(table[-1, -1])


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    _check(predictions, references)
    scores = []
    for prediction, refs in zip(predictions, references):
        words = prediction.split(" ")
        common = [(_lcs(r.split(" "), words), len(r.split(" "))) for r in refs]
        precision = max(lcs / len(words) for lcs, _ in common)
        recall = max(lcs / length for lcs, length in common)
        scores.append((1 + ROUGE_BETA ** 2) * precision * recall / (recall + ROUGE_BETA ** 2 * precision)
                      if precision and recall else 0.0)
    return float(np.mean(scores))


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    _check(predictions, references)
    grams = lambda text: [_ngrams(text.split(), n) for n in range(1, MAX_N + 1)]  # noqa: E731
    ref_grams = [[grams(r) for r in refs] for refs in references]
    frequency = collections.Counter()
    for refs in ref_grams:
        frequency.update({gram for ref in refs for per_n in ref for gram in per_n})
    log_clips = math.log(len(references))

    def vector(per_n):
        weights = [{g: count * (log_clips - math.log(max(1.0, frequency[g]))) for g, count in counts.items()}
                   for counts in per_n]
        norms = [math.sqrt(sum(w * w for w in weight.values())) for weight in weights]
        return weights, norms, sum(per_n[1].values())  # the length, counted in bigrams as pycocoevalcap does

    scores = []
    for prediction, refs in zip(predictions, ref_grams):
        weights, norms, length = vector(grams(prediction))
        total = np.zeros(MAX_N)
        for ref in refs:
            ref_weights, ref_norms, ref_length = vector(ref)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * CIDER_SIGMA ** 2))
            for n in range(MAX_N):
                value = sum(min(w, ref_weights[n].get(g, 0.0)) * ref_weights[n].get(g, 0.0)
                            for g, w in weights[n].items())
                if norms[n] and ref_norms[n]:
                    value /= norms[n] * ref_norms[n]
                total[n] += value * penalty
        scores.append(float(np.mean(total)) / len(refs) * 10.0)
    return float(np.mean(scores))


def meteor(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    _check(predictions, references)
    if not meteor_available():
        raise RuntimeError(METEOR_UNAVAILABLE)
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    score, _ = scorer.compute_score({i: list(refs) for i, refs in enumerate(references)},
                                    {i: [p] for i, p in enumerate(predictions)})
    return float(score)
