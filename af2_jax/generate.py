"""`generate`: the batch API over the serving engine. Each row is one engine request (its real prompt tokens, its
windows), decoded on the model's engine for that many rows (`engine_for`, shared with `af2_jax.answer`), so a
second call with the same shapes compiles nothing and every row's tokens are those it gets alone.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import jax
import numpy as np

from af2_jax.engine import Engine, Request, Sampling, bucket_prompt, bucket_rows
from af2_jax.sharding import data_parallel_size

# The engine of each model (and mesh, and cache length), dropped with the model.
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
DEFAULT_SLOTS = 8
DEFAULT_MAX_LEN = 768


def engine_for(model, tokenizer=None, *, slots: int = DEFAULT_SLOTS, mesh=None, max_len: int = DEFAULT_MAX_LEN,
               max_windows: int | None = None) -> Engine:
    """The engine of `model` for `slots`, `mesh`, a text cache of at least `max_len` (rounded up to a multiple of
    256, at least 768, so requests of similar length share one) and `max_windows` per clip (default the model's),
    kept while the model lives: `generate`, `answer`
    and `infer` decode on it, so the same shapes never compile twice. (One engine per slot count: on a CPU a step
    costs about its slot count, so a single question runs on one slot.)"""
    max_len = max(DEFAULT_MAX_LEN, -(-max_len // 256) * 256)
    engines = _ENGINES.setdefault(model, {})
    max_windows = max_windows or model.config.audio.max_windows
    engine = engines.get((slots, mesh, max_len, max_windows))
    if engine is None:
        engine = engines[slots, mesh, max_len, max_windows] = Engine(model, tokenizer, slots=slots, max_len=max_len,
                                                                     mesh=mesh, max_windows=max_windows)
    if tokenizer is not None and engine.tokenizer is None:
        engine.tokenizer = tokenizer
    return engine


def slots_for(requests: int, mesh=None) -> int:
    """The slot count `generate` and `answer` use for a batch: a power of two holding it that splits over the mesh's
    data axes."""
    return bucket_rows(max(requests, data_parallel_size(mesh)))


class GenerateOutput(NamedTuple):
    """What `generate` returns, on the host."""

    tokens: np.ndarray  # (B, N) new tokens; after a row's EOS, the pad id
    lengths: np.ndarray  # (B,) new tokens per row, its EOS included
    timings: dict  # seconds: compile_s (0 when all was compiled already), encode_s (audio), prefill_s, decode_s


def generate(model, input_ids, attention_mask, audio_x, audio_x_mask, max_new_tokens: int = 256,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, pad_token_id: int | None = None, key=None,
             on_token=None, mesh=None) -> GenerateOutput:
    """Generates up to `max_new_tokens` for each row of a batch.

    input_ids / attention_mask `(B, T)` (left or right padding both work: each row's real tokens keep their order);
    audio_x `(B, L, 160000)`, audio_x_mask `(B, L)`. Ids default to the model config's (a negative `eos_token_id`:
    never stop early); the pad id fills the rest of a stopped row. Sampling with `temperature > 0` needs `key` (a
    `jax.random.key`): row r samples with a seed drawn from `fold_in(key, r)`. `on_token(step, tokens)` is called
    with each step's `(B,)` new tokens (the pad id for a row that has stopped). With a `mesh` (the one the model was
    loaded on), the engine's slots split over its data axes.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    if ids.shape != mask.shape or ids.ndim != 2:
        raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be (B, T)")
    prompts = [row[keep != 0].tolist() for row, keep in zip(ids, mask)]
    if not all(prompts):
        raise ValueError("every row needs at least one prompt token")
    rule = Sampling(int(max_new_tokens), float(temperature), top_k, top_p)
    if not rule.greedy and key is None:
        raise ValueError("sampling (temperature > 0) needs key=jax.random.key(seed)")
    # eos_token_id replaces the model's EOS; a negative one (no such token) means decoding never stops early.
    stops = () if eos_token_id is None or int(eos_token_id) < 0 else (int(eos_token_id),)
    pad = model.config.tokens.pad if pad_token_id is None else int(pad_token_id)
    audio, audio_mask = np.asarray(audio_x, np.float32), np.asarray(audio_x_mask, np.float32)
    requests = []
    for row, prompt in enumerate(prompts):
        seed = 0 if rule.greedy else int(jax.random.randint(jax.random.fold_in(key, row), (), 0, 2 ** 31 - 1))
        requests.append(Request(prompt, (audio[row], audio_mask[row]),
                                Sampling(rule.max_new_tokens, rule.temperature, top_k, top_p, seed, stops,
                                         ignore_eos=eos_token_id is not None)))
    engine = engine_for(model, slots=slots_for(len(prompts), mesh), mesh=mesh,
                        max_len=bucket_prompt(max(map(len, prompts))) + max_new_tokens)
    steps = _Steps(len(prompts), pad, on_token) if on_token is not None else None
    timings = dict(engine.timings)
    done = engine.run(requests, on_token=None if steps is None else steps.add,
                      on_done=None if steps is None else steps.stop)
    tokens = np.full((len(prompts), max_new_tokens), pad, np.int32)
    for row, completion in enumerate(done):
        tokens[row, :len(completion.tokens)] = completion.tokens
    lengths = np.asarray([len(c.tokens) for c in done], np.int32)
    phases = ("compile_s", "encode_s", "prefill_s", "decode_s")
    return GenerateOutput(tokens, lengths, {k: engine.timings[k] - timings[k] for k in phases})


class _Steps:
    """Turns each row's streamed tokens into `on_token(step, (B,) tokens)` calls, step by step, once every row has
    its token of that step (the pad id for a row that has stopped)."""

    def __init__(self, rows: int, pad: int, on_token):
        self.pad, self.on_token = pad, on_token
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.stopped = [False] * rows
        self.sent = 0

    def add(self, row: int, tokens: list[int]) -> None:
        self.tokens[row].extend(tokens)
        self._flush()

    def stop(self, row: int, completion) -> None:
        self.stopped[row] = True
        self._flush()

    def _flush(self) -> None:
        rows = range(len(self.tokens))
        while all(len(self.tokens[r]) > self.sent or self.stopped[r] for r in rows) and \
                any(len(self.tokens[r]) > self.sent for r in rows):
            step = [self.tokens[r][self.sent] if len(self.tokens[r]) > self.sent else self.pad for r in rows]
            self.on_token(self.sent, np.asarray(step, np.int32))
            self.sent += 1


def left_pad(prompts, pad: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> `(B, width)` ids and mask, each row's tokens at the right end (left padding). `width`
    defaults to the longest prompt."""
    width = max(map(len, prompts)) if width is None else width
    ids = np.full((len(prompts), width), pad, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, tokens in enumerate(prompts):
        ids[row, width - len(tokens):] = tokens
        mask[row, width - len(tokens):] = 1
    return ids, mask
