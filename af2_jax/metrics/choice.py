"""MMAU's multiple-choice rule, written from the benchmark's documentation of its scorer.

Tokens are the `\\b\\w+\\b` matches of the lower-cased text. A prediction is correct when every token of the
reference choice is among its tokens and it has no token that appears only in the other choices (tokens the
reference shares with another choice do not count against it). So "(B) a dog barking" is right for the choice "a
dog barking", "dog barking or a cat" is wrong when "a cat" is another choice, and a bare letter ("B") is wrong, as
upstream: it names no choice text. `letter_only_share` reports how many answers were bare letters.

The choices come from the item (a list), or else from the prompt's `(A) ... (B) ...` options."""

from __future__ import annotations

import re
from typing import Sequence

_TOKEN = re.compile(r"\b\w+\b")
# An option: "(A)" at a line start or after a space, its text up to the next option or the end of its line.
_OPTION = re.compile(r"(?:^|(?<=\s))\(([A-Z])\)[ \t]*(.*?)[ \t]*(?=\s+\([A-Z]\)|\n|$)", re.M)
_LETTER = re.compile(r"^\s*\(?[A-Za-z]\)?[.:]?\s*$")


def _tokens(text: str) -> set[str]:
    return set(_TOKEN.findall(str(text).lower()))


def choices_from_prompt(prompt: str) -> list[str]:
    """The option texts of a prompt that lists them as `(A) text (B) text ...` (upper-case letters, on one line or
    one per line; the last option ends with its line)."""
    return [text.strip() for _, text in _OPTION.findall(prompt) if text.strip()]


def is_letter_only(prediction: str) -> bool:
    """Whether an answer is a bare option letter ("B", "(B)", "b.")."""
    return bool(_LETTER.match(prediction))


def is_correct_choice(prediction: str, reference: str, choices: Sequence[str]) -> bool:
    said = _tokens(prediction)
    wanted = _tokens(reference)
    others = set().union(*(_tokens(c) for c in choices if c.strip().lower() != reference.strip().lower())) - wanted
    return bool(wanted) and wanted <= said and not (said & others)


def mmau_choice(predictions: Sequence[str], references: Sequence[str], choices: Sequence[Sequence[str]]
                ) -> dict[str, float]:
    """`{"value": fraction correct, "letter_only_share": fraction of bare-letter answers}` over the items; each
    item's `choices` are its option texts (`choices_from_prompt` when the item has none)."""
    if not len(predictions) == len(references) == len(choices):
        raise ValueError(f"{len(predictions)} predictions, {len(references)} references, {len(choices)} choice lists")
    if not predictions:
        return {"value": 0.0, "letter_only_share": 0.0}
    right = sum(is_correct_choice(p, r, c) for p, r, c in zip(predictions, references, choices))
    letters = sum(is_letter_only(p) for p in predictions)
    return {"value": right / len(predictions), "letter_only_share": letters / len(predictions)}
