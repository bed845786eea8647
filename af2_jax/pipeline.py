"""Question answering over audio files: load audio, build prompts, batch, generate, extract answers."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from af2_jax.audio.io import collate_windows, load_windows
from af2_jax.config import AudioConfig
from af2_jax.generate import generate, left_pad


@dataclasses.dataclass
class Item:
    """One question about one clip, loaded and tokenised."""

    windows: np.ndarray  # (W, 160000)
    window_mask: np.ndarray  # (W,)
    prompt_ids: list[int]


def prepare(tokenizer, audio, question: str, max_windows: int | None = None,
            audio_config: AudioConfig = AudioConfig()) -> Item:
    """Audio (a path, or `(windows, mask)` already loaded) and a question -> model input. Windows follow
    `audio_config` (the model's `config.audio`); `max_windows` defaults to its `max_windows`."""
    if isinstance(audio, tuple):
        windows, mask = audio
    else:
        windows, mask = load_windows(audio, max_windows=max_windows or audio_config.max_windows, config=audio_config)
    return Item(windows, mask, tokenizer.prompt_ids(question))


def answer_items(model, tokenizer, items: Sequence[Item], *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k=None, top_p=None, key=None, on_token: Callable | None = None,
                 timings: dict | None = None, mesh=None) -> list[str]:
    """Answers for a batch of prepared items (one generate call). `on_token(step, tokens)` streams; `timings`, if
    given, accumulates the compile / audio-encode / decode seconds."""
    # generate() buckets the prompt length, the window count and the rows itself.
    audio, audio_mask = collate_windows([(it.windows, it.window_mask) for it in items])
    ids, mask = left_pad([it.prompt_ids for it in items], model.config.tokens.pad)
    out = generate(model, ids, mask, audio, audio_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, key=key, on_token=on_token, mesh=mesh)
    if timings is not None:
        for name, seconds in out.timings.items():
            timings[name] = timings.get(name, 0.0) + seconds
        timings["tokens"] = timings.get("tokens", 0) + int(out.lengths.sum())
    return [tokenizer.answer(it.prompt_ids, out.tokens[row, : out.lengths[row]]) for row, it in enumerate(items)]


def answer(model, tokenizer, audio, question: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
           top_k=None, top_p=None, key=None, max_windows: int | None = None) -> str:
    """The one-liner: `af2_jax.answer(model, tokenizer, "clip.wav", "What is happening?")` -> the answer text."""
    item = prepare(tokenizer, audio, question, max_windows, model.config.audio)
    return answer_items(model, tokenizer, [item], max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, key=key)[0]
