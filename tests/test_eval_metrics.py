"""The answer metrics on cases counted by hand: exact match's normalisation, MMAU's choice rule (option text, text
plus letter, two options named, none named, case and punctuation, a bare letter, choices from the prompt), F1."""

import pytest

from af2_jax.metrics import (accuracy, choices_from_prompt, exact_match, f1_macro, f1_micro, is_letter_only,
                             mmau_choice, normalise)

CHOICES = ["a dog barking", "a cat meowing", "rain falling", "a car horn"]


def test_exact_match_normalises_case_spaces_and_one_trailing_period():
    assert normalise("  A Dog\tbarking. ") == "a dog barking" and normalise("Yes..") == "yes."
    assert exact_match(["A dog barking.", "a  Dog barking", "dog"], ["a dog barking"] * 3) == pytest.approx(2 / 3)
    assert accuracy(["High", "low"], ["high", "High"]) == 0.5 and exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


@pytest.mark.parametrize("prediction, right", [
    ("a dog barking", True),  # the option's text
    ("(A) a dog barking", True),  # text plus letter
    ("A Dog Barking!", True),  # case and punctuation
    ("The sound is a dog barking.", True),  # more words, none of another option
    ("a dog barking or a cat meowing", False),  # two options named
    ("dog", False),  # not every token of the option
    ("silence", False),  # none named
    ("A", False),  # a bare letter names no option, as upstream
])
def test_mmau_choice(prediction, right):
    assert mmau_choice([prediction], ["a dog barking"], [CHOICES])["value"] == float(right)


def test_mmau_choice_counts_bare_letters_and_reads_choices_from_the_prompt():
    prompt = ("What is making the sound? Choose the correct option from the following options:\n(A) a dog barking\n"
              "(B) a cat meowing\n(C) rain falling")
    parsed = choices_from_prompt(prompt)
    assert parsed == ["a dog barking", "a cat meowing", "rain falling"]
    assert choices_from_prompt("Which? (A) loud (B) quiet") == ["loud", "quiet"]
    result = mmau_choice(["B", "(B) a cat meowing", "rain"], ["a cat meowing"] * 2 + ["rain falling"], [parsed] * 3)
    assert result == {"value": pytest.approx(1 / 3), "letter_only_share": pytest.approx(1 / 3)}
    assert is_letter_only("(c).") and is_letter_only(" b ") and not is_letter_only("b flat")


def test_f1_counted_by_hand():
    predictions, references = ["dog, cat", "rain", ""], ["dog", "Rain, wind.", "cat"]
    # tp: dog, rain; fp: cat (item 1); fn: wind, cat (item 3) -> micro 2*2 / (2*2 + 1 + 2)
    assert f1_micro(predictions, references) == pytest.approx(4 / 7)
    # per label: dog 1, rain 1, cat 0, wind 0
    assert f1_macro(predictions, references) == pytest.approx(0.5)
    assert f1_micro([], []) == f1_macro([], []) == 0.0


CAPTIONS = [  # 5 clips, a prediction and 3 references each
    ("a dog barks loudly in the distance", ["a dog is barking far away", "a dog barks in the distance",
                                           "distant barking of a dog"]),
    ("rain falls on a tin roof", ["rain is falling on a metal roof", "heavy rain on a roof",
                                  "rain drops hit a tin roof"]),
    ("a man speaks while cars pass by", ["a man talks as traffic passes", "cars pass by as a man is speaking",
                                         "a person speaks near a busy road"]),
    ("birds chirp", ["birds are chirping in the trees", "several birds chirp and sing", "birds chirp and tweet"]),
    ("a car horn honks twice", ["a car honks its horn two times", "a horn honks twice", "a vehicle horn sounds"]),
]


def test_caption_metrics_equal_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    from af2_jax.metrics import bleu_4, cider_d, rouge_l

    predictions = [p for p, _ in CAPTIONS]
    references = [r for _, r in CAPTIONS]
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [p] for i, p in enumerate(predictions)}
    assert bleu_4(predictions, references) == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3],
                                                            rel=1e-12)
    assert rouge_l(predictions, references) == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-12)
    assert cider_d(predictions, references) == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-12)


def test_tokenize_lower_cases_and_drops_punctuation_as_ptb_does():
    from af2_jax.metrics import captions

    plain = ["A dog barks, loudly!", "Rain -- on the roof.", "It's a car's horn; they don't stop?"]
    expected = ["a dog barks loudly", "rain on the roof", "it 's a car 's horn they do n't stop"]
    assert captions.tokenize(plain) == expected
    if captions.tokenizer_name() == "ptb":  # here the PTB tokenizer ran: the Python rule must agree with it
        import unittest.mock

        with unittest.mock.patch.object(captions, "tokenizer_name", return_value="python"):
            assert captions.tokenize(plain) == expected


def test_wer_counted_by_hand():
    from af2_jax.metrics import wer

    # "sat" -> "sit" (1 substitution), "world" deleted (1): 2 edits over 5 reference words; case and a final period
    # are not errors
    assert wer(["The cat sit.", "hello"], ["the cat sat", "Hello world"]) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="every reference is empty"):
        wer(["a"], [" "])
