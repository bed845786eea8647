"""Answer metrics as the audio-language field computes them, one small module each (layer 3: training and the
evaluation runner both use them): `exact` (exact match and single-label accuracy), `choice` (MMAU's
multiple-choice rule), `f1` (multi-label F1), `captions` (BLEU-4, ROUGE-L, CIDEr-D, METEOR), `wer`. Each function scores
predictions against references; none needs a model."""

from af2_jax.metrics.captions import bleu_4, cider_d, meteor, rouge_l, tokenize, tokenizer_name
from af2_jax.metrics.choice import choices_from_prompt, is_letter_only, mmau_choice
from af2_jax.metrics.exact import accuracy, exact_match, normalise
from af2_jax.metrics.f1 import f1_macro, f1_micro
from af2_jax.metrics.wer import wer

__all__ = ["accuracy", "bleu_4", "choices_from_prompt", "cider_d", "exact_match", "f1_macro", "f1_micro",
           "is_letter_only", "meteor", "mmau_choice", "normalise", "rouge_l", "tokenize", "tokenizer_name", "wer"]
