"""Answer metrics as the audio-language field computes them, one small module each (layer 3: training and the
evaluation runner both use them): `exact` (exact match and single-label accuracy), `choice` (MMAU's
multiple-choice rule), `f1` (multi-label F1). Each function scores predictions against references and returns
fractions; none needs a model."""

from af2_jax.metrics.choice import choices_from_prompt, is_letter_only, mmau_choice
from af2_jax.metrics.exact import accuracy, exact_match, normalise
from af2_jax.metrics.f1 import f1_macro, f1_micro

__all__ = ["accuracy", "choices_from_prompt", "exact_match", "f1_macro", "f1_micro", "is_letter_only",
           "mmau_choice", "normalise"]
