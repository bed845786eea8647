"""Training strings and loss labels exactly as the original (docs/original.md#training-string,
docs/original.md#label-rule).

`training_ids` builds `<audio>prompt<SEP>answer<|endofchunk|><|endoftext|>` and cuts it to `max_tokens`;
`make_labels` turns padded input ids into labels where -100 means "no loss".
"""

from __future__ import annotations

import numpy as np

from af2_jax.config import SpecialTokens

IGNORE = -100


def training_text(prompt: str, answer: str) -> str:
    """The original's training string: prompt and answer lower-cased and stripped, answer closed by EOC and EOS."""
    return f"<audio>{str(prompt).lower().strip()}<SEP>{str(answer).lower().strip()}<|endofchunk|><|endoftext|>"


def training_ids(tokenizer, prompt: str, answer: str, max_tokens: int) -> list[int]:
    """Token ids of the training string, truncated to `max_tokens` like the original's tokenizer call."""
    return tokenizer.encode(training_text(prompt, answer))[:max_tokens]


def make_labels(input_ids: np.ndarray, tokens: SpecialTokens) -> np.ndarray:
    """Labels for `(B, T)` right-padded ids, as `train_utils.train_one_epoch`:

    pad, position 0 and `<audio>` are ignored; scanning left to right from a "masked" state, every token except
    `<|endoftext|>` is ignored while masked; `<SEP>` unmasks what follows it (itself stays masked) and
    `<|endofchunk|>` masks again (itself kept). A row cut by `max_tokens` in the middle of an answer (its last label
    is a real answer token) has that trailing answer piece ignored too.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    labels = ids.copy()
    labels[labels == tokens.pad] = IGNORE
    labels[:, :1] = IGNORE
    labels[labels == tokens.media] = IGNORE
    out = np.empty_like(labels)
    for i in range(labels.shape[0]):
        masked = True
        for j, value in enumerate(labels[i]):
            out[i, j] = IGNORE if masked and value != tokens.eos else value
            if value == tokens.sep:
                masked = False
            elif value == tokens.end_of_chunk:
                masked = True
        if out[i, -1] not in (IGNORE, tokens.eos, tokens.pad, tokens.end_of_chunk):
            for j in range(labels.shape[1] - 1, -1, -1):
                if out[i, j] in (IGNORE, tokens.eos, tokens.end_of_chunk):
                    break
                out[i, j] = IGNORE
    return out


def pad_ids(rows: list[list[int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token rows to `length` with the pad id: `(ids, attention_mask)`, both int32 `(B, length)`."""
    ids = np.full((len(rows), length), pad, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask
