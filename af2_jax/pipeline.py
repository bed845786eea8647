"""Question answering over audio files: load audio, build prompts, decode on the engine, extract answers."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from af2_jax.audio.io import load_windows
from af2_jax.config import AudioConfig
from af2_jax.engine import Request, Sampling
from af2_jax.generate import DEFAULT_SLOTS, engine_for, slots_for


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


def answer_items(model, tokenizer, items: Sequence[Item], sampling: Sampling = Sampling(), *,
                 on_token: Callable[[int, list[int]], None] | None = None, timings: dict | None = None,
                 mesh=None) -> list[str]:
    """Answers for prepared items, decoded together on the model's engine for up to 8 of them at once
    (`af2_jax.generate.engine_for`).
    `on_token(i, tokens)` streams item i's new tokens; `timings`, if given, accumulates the compile / audio-encode /
    decode seconds and the tokens made."""
    need = max(len(it.prompt_ids) for it in items) + sampling.max_new_tokens
    engine = engine_for(model, tokenizer, slots=min(DEFAULT_SLOTS, slots_for(len(items), mesh)), mesh=mesh,
                        max_len=need)
    before = dict(engine.timings)
    done = engine.run([Request(it.prompt_ids, (it.windows, it.window_mask), sampling) for it in items],
                      on_token=on_token)
    if timings is not None:
        for name in engine.timings:
            timings[name] = timings.get(name, 0) + engine.timings[name] - before[name]
    return [tokenizer.answer(it.prompt_ids, completion.tokens) for it, completion in zip(items, done)]


def answer(model, tokenizer, audio, question: str, sampling: Sampling | None = None, *,
           max_windows: int | None = None, history=(), **options) -> str:
    """The one-liner: `af2_jax.answer(model, tokenizer, "clip.wav", "What is happening?")` -> the answer text.

    `audio` is any form a `Request` takes: a path, `(windows, mask)`, a waveform `{"array", "sampling_rate"}`, a
    list of these (several clips), or None (a question without audio); `history` holds earlier turns
    `(audio, question, answer)`. Each clip is cut to `max_windows` (default the model's). The decoding rule is
    `sampling` (an `af2_jax.Sampling`) or built from `options`, its fields (`max_new_tokens=32, temperature=0.7,
    seed=1`); default greedy, 256 new tokens."""
    if sampling is not None and options:
        raise ValueError(f"pass either sampling= or its fields ({', '.join(options)}), not both")
    sampling = sampling or Sampling(**options)
    engine = engine_for(model, tokenizer, slots=1, max_len=tokenizer.max_prompt_tokens + sampling.max_new_tokens,
                        max_windows=max_windows)
    return engine.run([Request(question, audio, sampling, tuple(history))])[0].text
