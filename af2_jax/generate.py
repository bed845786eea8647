"""Generation: audio encoded once and every layer's cross-attention K/V computed once (one compiled program), then
prefill and a decode loop inside one `lax.while_loop` (a second compiled program).

Shapes are bucketed on the host so a handful of compiled programs serve every request: prompts are left-padded to a
power of two (at least 16 tokens), window counts are padded with masked all-zero windows to the next bucket (both
paddings are exact: padded keys get exactly zero attention), and the batch is filled up to a power of two with rows
whose output is dropped. Positions are `cumsum(mask) - 1` (padding gets 1, as
`transformers` does), the text KV cache has a static size (prompt bucket + `max_new_tokens`), and every row stops
at its own EOS; the loop exits early once all rows have.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from typing import NamedTuple

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax.sharding import activation_sharding, batch_sharding, data_parallel_size

log = logging.getLogger(__name__)

# At most a quarter of a bucket is padding: every padded window costs a full HTSAT pass and its share of the
# cross-attention K/V read at every decoding step.
WINDOW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 30)
MIN_PROMPT_BUCKET = 16


class GenerateOutput(NamedTuple):
    """What `generate` returns, on the host."""

    tokens: np.ndarray  # (B, N) new tokens; after a row's EOS, the pad id
    lengths: np.ndarray  # (B,) new tokens per row, its EOS included
    timings: dict  # seconds: compile_s (0 when every program was cached), encode_s (audio), decode_s (text)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Decoding rule. temperature 0 is greedy; top_k / top_p restrict sampling (None: off)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        # Written so that NaN fails too (every comparison with NaN is false): a NaN or infinite temperature turns
        # every logit into NaN or zero, and sampling then returns garbage.
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def bucket_prompt(length: int) -> int:
    return max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())


def bucket_rows(count: int) -> int:
    return 1 << (count - 1).bit_length()


def bucket_windows(count: int) -> int:
    for size in WINDOW_BUCKETS:
        if count <= size:
            return size
    return count


def sample(logits, key, sampling: Sampling):
    """Next tokens `(B,)` from float32 logits `(B, V)`."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the best token always stays).
        drop_sorted = (jnp.cumsum(probs, axis=-1) - probs) >= sampling.top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# The Python function that receives streamed tokens; the compiled program calls it through `_emit`, so one compiled
# program serves every listener.
_STREAM_LISTENER = [None]


def _emit(step, tokens):
    listener = _STREAM_LISTENER[0]
    if listener is not None:
        listener(int(step), np.asarray(tokens))


def _encode(state, audio_x, audio_x_mask, *, graphdef):
    """HTSAT over every window, the audio transformer, and every layer's cross-attention K/V: once per request."""
    model = nnx.merge(graphdef, state)
    media, media_mask = model.encode_audio(audio_x, audio_x_mask)
    return model.media_kv(media), media_mask


def _decode(state, media_kv, media_mask, input_ids, attention_mask, key, *, graphdef, max_new_tokens: int,
            sampling: Sampling, eos: int, pad: int, stream: bool = False):
    """Prefill, then the decode loop in one `lax.while_loop`."""
    model = nnx.merge(graphdef, state)
    b, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens

    # Slot s of the cache holds prompt token s (s < prompt_len) or new token s - prompt_len.
    key_valid = jnp.concatenate([attention_mask != 0, jnp.ones((b, max_new_tokens), bool)], axis=1)
    slots = jnp.arange(total)
    positions = jnp.where(attention_mask != 0, jnp.cumsum(attention_mask, axis=1) - 1, 1)
    next_position = positions[:, -1] + 1

    prefill_mask = (slots[None, None, :] <= jnp.arange(prompt_len)[None, :, None]) & key_valid[:, None, :]
    hidden, cache = model.cached_step(input_ids, positions, prefill_mask, media_kv, media_mask,
                                      model.init_cache(b, total), 0)
    key, step_key = jax.random.split(key)
    first = sample(model.logits(hidden[:, -1]), step_key, sampling)

    if stream:
        jax.experimental.io_callback(_emit, None, 0, first, ordered=True)
    tokens = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(first)
    done = first == eos
    lengths = jnp.ones((b,), jnp.int32)

    def cond(carry):
        step, _, done, *_ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, tokens, done, lengths, cache, key = carry
        last = tokens[:, step - 1]
        slot = prompt_len + step - 1
        mask = (slots[None, None, :] <= slot) & key_valid[:, None, :]
        hidden, cache = model.cached_step(last[:, None], (next_position + step - 1)[:, None], mask, media_kv,
                                          media_mask, cache, slot)
        key, step_key = jax.random.split(key)
        token = sample(model.logits(hidden[:, 0]), step_key, sampling)
        token = jnp.where(done, pad, token)
        if stream:
            jax.experimental.io_callback(_emit, None, step, token, ordered=True)
        tokens = tokens.at[:, step].set(token)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | (token == eos)
        return step + 1, tokens, done, lengths, cache, key

    _, tokens, _, lengths, _, _ = jax.lax.while_loop(cond, body, (1, tokens, done, lengths, cache, key))
    return tokens, lengths


def generate(model, input_ids, attention_mask, audio_x, audio_x_mask, max_new_tokens: int = 256,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, pad_token_id: int | None = None, key=None,
             on_token=None, mesh=None) -> GenerateOutput:
    """Generates up to `max_new_tokens` for each row of a batch.

    input_ids / attention_mask `(B, T)` (left or right padding both work: each row's real tokens keep their order);
    audio_x `(B, L, 160000)`, audio_x_mask `(B, L)`. Ids default to the model config's. Sampling with
    `temperature > 0` needs `key` (a `jax.random.key`). `on_token(step, tokens)` is called with each step's
    `(B,)` new tokens as they are decoded (streaming). With a `mesh` (the one the model was loaded on), the batch
    is split over its data axes.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = Sampling(float(temperature), top_k, top_p)
    if not sampling.greedy and key is None:
        raise ValueError("sampling (temperature > 0) needs key=jax.random.key(seed)")
    tokens_cfg = model.config.tokens
    eos = tokens_cfg.eos if eos_token_id is None else int(eos_token_id)
    pad = tokens_cfg.pad if pad_token_id is None else int(pad_token_id)
    ids, mask = _left_pad(np.asarray(input_ids), np.asarray(attention_mask), pad)
    audio, audio_mask = _pad_windows(np.asarray(audio_x, np.float32), np.asarray(audio_x_mask, np.float32))
    rows = ids.shape[0]
    ids, mask, audio, audio_mask = _pad_rows(bucket_rows(max(rows, data_parallel_size(mesh))), ids, mask, audio,
                                             audio_mask)
    if mesh is not None:

        ids, mask, audio, audio_mask = (jax.device_put(a, batch_sharding(mesh, a.shape[0], a.ndim))
                                        for a in (ids, mask, audio, audio_mask))
    graphdef, state = nnx.split(model)
    # Compiling takes long enough to look like a hang (minutes on the release), so it is announced, once per call.
    announce = functools.cache(lambda: log.info(
        "compiling for %d row(s) x %d window(s), prompt %d + %d new tokens (%s)", ids.shape[0], audio.shape[1],
        ids.shape[1], max_new_tokens, _cache_note()))
    timings = {"compile_s": 0.0}
    start = time.perf_counter()
    with activation_sharding(mesh, model.config):
        encode, timings["compile_s"] = _compiled(_encode, (state, audio, audio_mask), {"graphdef": graphdef},
                                                 announce)
    media_kv, media_mask = jax.block_until_ready(encode(state, audio, audio_mask))
    timings["encode_s"] = time.perf_counter() - start - timings["compile_s"]
    args = (state, media_kv, media_mask, ids, mask, key if key is not None else jax.random.key(0))
    statics = {"graphdef": graphdef, "max_new_tokens": int(max_new_tokens), "sampling": sampling, "eos": eos,
               "pad": pad, "stream": on_token is not None}
    start = time.perf_counter()
    with activation_sharding(mesh, model.config):
        decode, compile_s = _compiled(_decode, args, statics, announce)
    _STREAM_LISTENER[0] = on_token
    try:
        tokens, lengths = jax.block_until_ready(decode(*args))
    finally:
        _STREAM_LISTENER[0] = None
    timings["decode_s"] = time.perf_counter() - start - compile_s
    timings["compile_s"] += compile_s
    if not tokens.is_fully_addressable:  # a mesh across processes: every process gets every row
        from jax.experimental import multihost_utils

        tokens, lengths = multihost_utils.process_allgather((tokens, lengths), tiled=True)
    return GenerateOutput(np.asarray(tokens)[:rows], np.asarray(lengths)[:rows], timings)


# Compiled programs by (function, static arguments, argument shapes and shardings): compiled ahead of time so
# compilation is timed apart from running, and reused for every request of the same bucketed shape.
_PROGRAMS: dict = {}


def _compiled(fn, args, statics, announce):
    """The compiled program and the seconds it took (0 when this process had it); `announce()` runs before a
    program is compiled."""
    leaves, tree = jax.tree.flatten(args)
    signature = (fn.__name__, tuple(sorted(statics.items(), key=lambda kv: kv[0])), tree,
                 tuple((leaf.shape, leaf.dtype, getattr(leaf, "sharding", None)) for leaf in leaves))
    program = _PROGRAMS.get(signature)
    if program is not None:
        return program, 0.0
    announce()
    start = time.perf_counter()
    program = jax.jit(functools.partial(fn, **statics)).lower(*args).compile()
    _PROGRAMS[signature] = program
    return program, time.perf_counter() - start


def _cache_note() -> str:
    """Where compiled programs are kept between processes, for the compile line."""
    folder = jax.config.jax_compilation_cache_dir
    if folder:
        return f"first run only; cached in {folder}"
    return "once per process: JAX's compilation cache is off"


def compiled_programs() -> int:
    """How many distinct programs generation has compiled in this process."""
    return len(_PROGRAMS)


def _pad_rows(count: int, ids, mask, audio, audio_mask):
    """Appends filler rows up to `count`: one real token (the last column) and no audio; their output is dropped."""
    extra = count - ids.shape[0]
    if extra == 0:
        return ids, mask, audio, audio_mask
    filler_mask = np.zeros((extra, mask.shape[1]), mask.dtype)
    filler_mask[:, -1] = 1
    return (np.concatenate([ids, np.repeat(ids[:1], extra, axis=0)]), np.concatenate([mask, filler_mask]),
            np.concatenate([audio, np.zeros((extra, *audio.shape[1:]), audio.dtype)]),
            np.concatenate([audio_mask, np.zeros((extra, audio_mask.shape[1]), audio_mask.dtype)]))


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


def _left_pad(ids: np.ndarray, mask: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Moves every row's real tokens to the right end of a bucket-sized row."""
    if ids.shape != mask.shape or ids.ndim != 2:
        raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be (B, T)")
    prompts = [row[keep != 0] for row, keep in zip(ids, mask)]
    if not all(len(p) for p in prompts):
        raise ValueError("every row needs at least one prompt token")
    return left_pad(prompts, pad, bucket_prompt(max(map(len, prompts))))


def _pad_windows(audio: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    count = bucket_windows(audio.shape[1])
    if count == audio.shape[1]:
        return audio, mask
    extra = count - audio.shape[1]
    audio = np.concatenate([audio, np.zeros((audio.shape[0], extra, audio.shape[2]), audio.dtype)], axis=1)
    return audio, np.concatenate([mask, np.zeros((mask.shape[0], extra), mask.dtype)], axis=1)
