"""The serving engine: requests decode in slots with continuous batching, on compiled programs the engine owns.

A request is encoded (HTSAT, the audio transformer and every layer's cross-attention K/V; batch 1, at its own window
bucket), prefilled (its prompt but the last token written into a fresh text cache of `max_len` positions; batch 1)
and inserted into a free row of the slot group, where it decodes with the other requests, several steps per
compiled call, until it stops; the row is then free for the next request. Its first decoding step reads the
prompt's last token and samples the first new one, so a prefill computes no logits. New requests join between calls while the
others keep their caches, so a short answer never waits for a long one.

The group's cross-attention K/V are as wide as the widest request in flight (a window bucket): a wider request widens
them as it joins, and they narrow again once the widest has left, so a one-window request pays for a neighbour's
thirty windows only while that neighbour decodes. On a CPU the group likewise has as many rows as the smallest row
bucket holding its requests (`row_buckets`): a step computes every row there, so a request alone decodes as fast as
on a one-slot engine; rows are compacted as requests leave. One group reads the weights once per step; a group per window
bucket would read them once per group, which costs more than the padding for every released model (`docs/design.md`
has the figures). Padded windows are masked: their keys get exactly zero weight.

Shapes are static, so the compiled programs are bounded whatever the traffic (`EnginePrograms.bound`).

A row's tokens depend on its own request only: its sampling key for its n-th token is `fold_in(key(seed), n)`, masks,
positions and cache indices are per row, and no row's arithmetic reads another's. So greedy tokens equal the request
decoded alone and a seeded sampled request gives the same tokens whatever its batch-mates and arrival time (tested
token for token; the group's width, which the batch-mates set, changes only how many masked keys a reduction adds).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import threading
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax.audio.io import load_windows, waveform_windows
from af2_jax.config import MAX_WINDOWS_LIMIT, check_max_windows
from af2_jax.nn.af2 import abstract_relayout, relayout
from af2_jax.nn.layer_stack import stacked_to_list
from af2_jax.sharding import activation_sharding, check_batch_splits, data_parallel_size

log = logging.getLogger(__name__)

# At most a quarter of a bucket is padding: every padded window costs a full HTSAT pass and its share of the
# cross-attention K/V read at every decoding step.
WINDOW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 30)
MIN_PROMPT_BUCKET = 16
MAX_STOP_IDS = 8  # stop ids per request besides the model's EOS


def bucket_prompt(length: int) -> int:
    return max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())


def bucket_rows(count: int) -> int:
    return 1 << (count - 1).bit_length()


def row_buckets(slots: int, data: int = 1, elastic: bool = True) -> tuple[int, ...]:
    """The row counts a slot group takes: elastic, `data` (the data-parallel devices, over which rows split) times
    powers of two up to `slots`, and the group has the fewest rows holding its requests; else always `slots`.

    Elastic rows pay where a step's cost grows with its rows: on a CPU, which computes every row, one request alone
    then decodes as fast as on a one-slot engine (4-5x faster than in a 16-row group for the benchmark model). On
    an accelerator a decoding step costs its weight reads whatever the rows, and every row bucket is one more
    decode program per window bucket to compile (tens of seconds each for the release), so rows stay fixed."""
    if not elastic:
        return (slots,)
    return tuple(sorted({min(slots, data << k) for k in range(slots.bit_length() + 1)}))


def bucket_windows(count: int) -> int:
    return next((size for size in WINDOW_BUCKETS if count <= size), count)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How one request decodes: up to `max_new_tokens`; temperature 0 is greedy; `top_k` / `top_p` restrict sampling
    (None: off); `seed` fixes the sampled tokens; the answer stops at the model's EOS (unless `ignore_eos`) and at
    any of `stop_ids`. Checked here, once, where it is built."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        # Written so that NaN fails too (every comparison with NaN is false): a NaN or infinite temperature turns
        # every logit into NaN or zero, and sampling then returns garbage.
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and not 1 <= self.top_k < 2 ** 31:
            raise ValueError(f"top_k must be in 1..2**31-1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be in 0..2**63-1, got {self.seed}")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        if len(self.stop_ids) > MAX_STOP_IDS or any(i < 0 for i in self.stop_ids):
            raise ValueError(f"stop_ids: at most {MAX_STOP_IDS} token ids >= 0, got {self.stop_ids}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclasses.dataclass(frozen=True)
class Request:
    """One question: `prompt` is a question (the prompt template is applied), a list of parts `{"text": str}` and
    `{"audio": clip}` in any order (the texts joined with one space, the clips in order, before those of `audio`),
    or prompt ids used as they are.

    `audio` is the question's clips: a file path, `(windows (W, 160000), mask (W,))` already loaded, a waveform
    `{"array": samples, "sampling_rate": rate}`, a list of these, or None / [] for a question without audio. Each clip
    is windowed on its own (cut to the engine's `max_windows`); the request's windows, in order, may total 30.
    `history` holds earlier turns `(audio, question, answer)`, oldest first, each question a text or parts as
    `prompt` (`AF2Tokenizer.prompt_ids` says how they enter the prompt; the released model was trained on single
    turns)."""

    prompt: str | Sequence[int]
    audio: object = None
    sampling: Sampling = Sampling()
    history: tuple = ()


class EngineFull(RuntimeError):
    """More requests are waiting than the engine's `max_pending`; retry later (the server answers 429)."""


class DoesNotFit(ValueError):
    """A request's prompt and `max_new_tokens` need more cache positions than the engine's `max_len` holds."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, max_len: int):
        self.prompt_tokens, self.max_new_tokens, self.max_len = prompt_tokens, max_new_tokens, max_len
        super().__init__(f"the prompt ({prompt_tokens} tokens) and max_new_tokens ({max_new_tokens}) need "
                         f"{prompt_tokens + max_new_tokens} cache positions, over the engine's max_len {max_len}; "
                         "ask for fewer new tokens or use a larger max_len")


class TooMuchAudio(ValueError):
    """A request's clips total more windows than one request may have (`MAX_WINDOWS_LIMIT`)."""

    def __init__(self, windows: int):
        self.windows = windows
        super().__init__(f"the request's clips have {windows} windows in all, over the limit of {MAX_WINDOWS_LIMIT} "
                         f"({MAX_WINDOWS_LIMIT} windows = 5 minutes); ask about less audio")


@dataclasses.dataclass
class Completion:
    """A finished request: its new tokens (a stop token included), why it ended ("stop", "length" or "cancelled"),
    the prompt ids it was asked with and the answer text (None when the prompt was given as ids)."""

    tokens: list[int]
    finish_reason: str
    prompt_ids: list[int]
    text: str | None


class Handle:
    """A submitted request. `result()` waits for its `Completion` (and drives the engine meanwhile when nothing
    else does); `done()` says whether it has one."""

    def __init__(self, engine: Engine, request: Request, prompt_ids: list[int], windows, window_mask, on_token,
                 on_done, number: int, notes: list[str]):
        self.engine, self.request, self.number = engine, request, number
        self.prompt_ids, self.windows, self.window_mask = prompt_ids, windows, window_mask
        self.on_token, self.on_done = on_token, on_done
        self.notes = notes  # what was cut from its prompt (also logged)
        self.tokens: list[int] = []
        self.completion: Completion | None = None
        self.cancelled = False
        self._finished = threading.Event()

    def done(self) -> bool:
        return self._finished.is_set()

    def result(self, timeout: float | None = None) -> Completion:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._finished.is_set():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"request {self.number} did not finish in {timeout} s")
            self.engine._drive(self._finished)
        return self.completion


class Group(NamedTuple):
    """The decoding state of one slot group: every field has the slot count as its leading (batch) axis; `cache`
    and `media_kv` are per-layer values of the model's layer form."""

    cache: object  # per-layer (K, V) text caches (S, kv_heads, max_len, head_dim)
    media_kv: object  # per-layer cross-attention (K, V) (S, heads, W*64, dim_head)
    media_mask: jax.Array  # (S, W*64)
    key_valid: jax.Array  # (S, max_len) bool: cache positions holding a real token
    last: jax.Array  # (S,) the newest token, written to the cache by the next step
    position: jax.Array  # (S,) its position
    index: jax.Array  # (S,) the cache position it is written to
    count: jax.Array  # (S,) new tokens so far
    max_new: jax.Array  # (S,)
    running: jax.Array  # (S,) bool
    temperature: jax.Array  # (S,) 0 = greedy
    top_k: jax.Array  # (S,) 0 = off
    top_p: jax.Array  # (S,) 1 = off
    key: jax.Array  # (S,) typed PRNG keys, one per request
    stop: jax.Array  # (S, 1 + MAX_STOP_IDS) stop ids, -1 = none


# One prefilled request, ready to be inserted into a group: a group of one row.
Row = Group


def sample_rows(logits, keys, temperature, top_k, top_p):
    """Next tokens `(B,)` from float32 logits `(B, V)`, each row by its own rule and key; rows with temperature 0
    take the argmax. The sampling work runs only when some row samples."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        vocab = logits.shape[-1]
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        ranked = -jnp.sort(-scaled, axis=-1)  # descending
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        ranked = jnp.where(jnp.arange(vocab)[None] < k[:, None], ranked, -jnp.inf)
        probs = jax.nn.softmax(ranked, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the best token always stays): its last value is the
        # threshold every kept logit reaches.
        kept = ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) | (jnp.arange(vocab)[None] == 0)
        threshold = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1)
        masked = jnp.where(scaled >= threshold[:, None], scaled, -jnp.inf)
        return jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, masked).astype(jnp.int32)

    tokens = jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)
    return jnp.where(temperature > 0, tokens, greedy)


def _token_keys(keys, count):
    return jax.vmap(jax.random.fold_in)(keys, count)


def _encode(state, audio, audio_mask, *, graphdef):
    """HTSAT over every window, the audio transformer, and every layer's cross-attention K/V."""
    model = nnx.merge(graphdef, state)
    media, media_mask = model.encode_audio(audio, audio_mask)
    return model.media_kv(media), media_mask


def _zero_media(model, rows: int, windows: int, tokens_per_window: int, media_dim: int, dtype):
    """All-masked zero cross-attention K/V (per-layer values) and mask `(rows, windows * tokens_per_window)`, shaped
    by tracing `media_kv` (no weights are read)."""
    media = jax.ShapeDtypeStruct((rows, windows * tokens_per_window, media_dim), dtype)
    media_kv = jax.tree.map(lambda spec: jnp.zeros(spec.shape, spec.dtype), jax.eval_shape(model.media_kv, media))
    return media_kv, jnp.zeros(media.shape[:2], jnp.float32)


def _blank(state, *, graphdef, windows: int, tokens_per_window: int, media_dim: int, dtype):
    """The cross-attention K/V and mask of a request without audio."""
    return _zero_media(nnx.merge(graphdef, state), 1, windows, tokens_per_window, media_dim, dtype)


def _prefill(state, media_kv, media_mask, ids, length, sampling, *, graphdef, max_len: int):
    """A prompt `ids (1, P)` whose first `length` tokens are real (right padding) into a fresh text cache, all but
    its last token: the request's `Row`, whose first decoding step reads the last token and samples the first new
    one. So a prefill computes no logits: the output projection (the tied embedding, the largest single weight) is
    read once per step for every row in the group instead of once more per request."""
    model = nnx.merge(graphdef, state)
    prompt = ids.shape[1]
    before = length - 1
    real = jnp.arange(prompt)[None] < before[:, None]  # (1, P)
    key_valid = jnp.concatenate([real, jnp.zeros((1, max_len - prompt), bool)], axis=1)
    positions = jnp.where(real, jnp.arange(prompt)[None], 0)
    causal = jnp.arange(max_len)[None, None, :] <= jnp.arange(prompt)[None, :, None]
    _, cache = model.cached_step(ids, positions, causal & key_valid[:, None, :], media_kv, media_mask,
                                 model.init_cache(1, max_len), 0)
    temperature, top_k, top_p, key, max_new, stop = sampling
    last = jnp.take_along_axis(ids, before[:, None], axis=1)[:, 0]
    return Row(cache, media_kv, media_mask, key_valid, last, before, before, jnp.zeros((1,), jnp.int32), max_new,
               jnp.ones((1,), bool), temperature, top_k, top_p, key, stop)


def _empty_group(state, *, graphdef, slots: int, windows: int, max_len: int, tokens_per_window: int, media_dim: int,
                 dtype):
    """A group of `slots` free rows (zeros: no weights are read)."""
    model = nnx.merge(graphdef, state)
    media_kv, media_mask = _zero_media(model, slots, windows, tokens_per_window, media_dim, dtype)
    rows = lambda dtype, fill=0: jnp.full((slots,), fill, dtype)  # noqa: E731
    return Group(model.init_cache(slots, max_len), media_kv, media_mask,
                 jnp.zeros((slots, max_len), bool), rows(jnp.int32), rows(jnp.int32), rows(jnp.int32),
                 rows(jnp.int32), rows(jnp.int32, 1), rows(bool), rows(jnp.float32), rows(jnp.int32),
                 rows(jnp.float32, 1), jax.random.split(jax.random.key(0), slots),
                 jnp.full((slots, 1 + MAX_STOP_IDS), -1, jnp.int32))


def _media_width(media_kv, media_mask, tokens: int):
    """Cross-attention K/V `(..., S, dim_head)` and mask `(B, S)` cut or padded (masked) to S = `tokens`."""
    def fit(x, axis):
        have = x.shape[axis]
        if have >= tokens:
            return jax.lax.slice_in_dim(x, 0, tokens, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis % x.ndim] = (0, tokens - have)
        return jnp.pad(x, pad)

    return jax.tree.map(lambda x: fit(x, -2), media_kv), fit(media_mask, -1)


def _insert(state, group: Group, row: Row, slot, *, graphdef):
    """`row` written into row `slot` of `group`, its K/V padded to the group's width."""
    model = nnx.merge(graphdef, state)
    media_kv, media_mask = _media_width(row.media_kv, row.media_mask, group.media_mask.shape[1])
    cache = model.write_rows(group.cache, row.cache, slot)
    media_kv = model.write_rows(group.media_kv, media_kv, slot)
    row = row._replace(media_mask=media_mask)
    rest = [jax.lax.dynamic_update_index_in_dim(g, r[0], slot, 0) for g, r in zip(group[2:], row[2:])]
    return Group(cache, media_kv, *rest)


def _resize(state, group: Group, *, graphdef, tokens: int):
    """The group with its cross-attention K/V widened (masked padding) or narrowed to `tokens` media tokens."""
    del state, graphdef  # the same signature as every program; nothing of the model is needed
    media_kv, media_mask = _media_width(group.media_kv, group.media_mask, tokens)
    return group._replace(media_kv=media_kv, media_mask=media_mask)


def _regroup(state, group: Group, take, *, graphdef):
    """The group's rows rearranged into `take.shape[0]` rows: new row i is row `take[i]`, or a free row where
    `take[i]` is -1. How the row count follows the requests in flight; a row's values move unchanged."""
    model = nnx.merge(graphdef, state)
    index = jnp.maximum(take, 0)
    rest = [x[index] for x in group[2:]]
    moved = Group(model.take_rows(group.cache, index), model.take_rows(group.media_kv, index), *rest)
    return moved._replace(running=moved.running & (take >= 0))


def _decode(state, group: Group, *, graphdef, steps: int):
    """Up to `steps` tokens for every running row, stopping early once a row makes its first token (so it reaches
    its caller at once) or finishes (so its slot is freed at once), or none runs. Returns the group and the new
    tokens `(S, steps)` (-1 where a row made none)."""
    model = nnx.merge(graphdef, state)
    slots = group.last.shape[0]
    rows = jnp.arange(slots)

    def cond(carry):
        step, g, _, finished = carry
        return (step < steps) & ~finished & jnp.any(g.running)

    def body(carry):
        step, g, out, _ = carry
        key_valid = g.key_valid.at[rows, g.index].set(g.key_valid[rows, g.index] | g.running)
        hidden, cache = model.cached_step(g.last[:, None], g.position[:, None], key_valid[:, None, :], g.media_kv,
                                          g.media_mask, g.cache, g.index)
        token = sample_rows(model.logits(hidden[:, 0]), _token_keys(g.key, g.count), g.temperature, g.top_k,
                            g.top_p)
        count = g.count + g.running
        stopped = jnp.any(token[:, None] == g.stop, axis=-1) | (count >= g.max_new)
        out = out.at[:, step].set(jnp.where(g.running, token, -1))
        advance = g.running.astype(jnp.int32)
        g = g._replace(cache=cache, key_valid=key_valid, last=jnp.where(g.running, token, g.last),
                       position=g.position + advance, index=g.index + advance, count=count,
                       running=g.running & ~stopped)
        return step + 1, g, out, jnp.any((stopped | (count == 1)) & (advance > 0))

    out = jnp.full((slots, steps), -1, jnp.int32)
    _, group, out, _ = jax.lax.while_loop(cond, body, (0, group, out, False))
    return group, out


class EnginePrograms:
    """The compiled programs of one engine, by kind, static arguments and argument shapes; compiled ahead of time,
    so compile time is measured apart, and kept in a bounded cache (least recently used goes first). `count` is how
    many are held and `keys()` what they are; `bound(groups, prompt_buckets)` is how many serving can ever need;
    `compiled(kind, args, **statics)` compiles (or returns) one for concrete or abstract arguments, which is how
    `plan` sizes exactly what serving runs."""

    FUNCTIONS = {"encode": "_encode", "blank": "_blank", "group": "_empty_group", "prefill": "_prefill",
                 "insert": "_insert", "resize": "_resize", "regroup": "_regroup", "decode": "_decode"}
    # The programs that take the group and return its next state of the same shapes update it in place: without
    # donation every call would copy every row's caches (a step's memory traffic again, for nothing).
    DONATES_GROUP = ("insert", "decode")

    def __init__(self, graphdef, config, *, mesh=None, capacity: int = 256, announce: Callable[[str], None] = None):
        self.graphdef, self.config, self.mesh, self.capacity = graphdef, config, mesh, capacity
        self.announce = announce or (lambda what: None)
        self.compile_s_by_kind: collections.Counter = collections.Counter()  # where compile time goes
        self._programs: collections.OrderedDict = collections.OrderedDict()

    @staticmethod
    def bound(windows: int, prompts: int, rows: int = 1) -> int:
        """Programs that serving requests of `windows` window buckets and `prompts` prompt buckets on `rows` row
        buckets (`Engine.row_buckets`) can need: per window bucket an encode; per (window, prompt) bucket a prefill;
        per (row, window) bucket a group set-up and a decode; per row bucket, an insert per pair of a group width and
        a narrower or equal request and a resize per ordered pair of widths; per width a regroup per ordered pair
        of row buckets; and the blank K/V of requests without audio."""
        return (windows * (1 + prompts) + rows * windows * 2 + rows * windows * (windows + 1) // 2
                + rows * windows * (windows - 1) + rows * (rows - 1) * windows + 1)

    @property
    def count(self) -> int:
        return len(self._programs)

    @property
    def compile_s(self) -> float:
        """Seconds spent compiling, over the engine's life."""
        return sum(self.compile_s_by_kind.values())

    def keys(self) -> list[tuple]:
        return list(self._programs)

    def compiled(self, kind: str, args, **statics):
        leaves, tree = jax.tree.flatten(args)
        # Without a mesh everything is on the default device, so placements say nothing, and a program compiled
        # from abstract arguments (no placement) serves the arrays it was compiled for.
        placed = lambda leaf: getattr(leaf, "sharding", None) if self.mesh is not None else None  # noqa: E731
        key = (kind, tuple(sorted(statics.items())), tree,
               tuple((leaf.shape, leaf.dtype, placed(leaf)) for leaf in leaves))
        program = self._programs.get(key)
        if program is not None:
            self._programs.move_to_end(key)
            return program
        self.announce(kind)
        start = time.perf_counter()
        fn = functools.partial(globals()[self.FUNCTIONS[kind]], graphdef=self.graphdef, **statics)
        with activation_sharding(self.mesh, self.config):
            program = jax.jit(fn, donate_argnums=(1,) if kind in self.DONATES_GROUP else ()).lower(*args).compile()
        self.compile_s_by_kind[kind] += time.perf_counter() - start
        self._programs[key] = program
        if len(self._programs) > self.capacity:
            self._programs.popitem(last=False)
        return program

    def run(self, kind: str, args, **statics):
        return self.compiled(kind, args, **statics)(*args)

    def for_shapes(self, state, *, dtype, slots: int, windows: int, prompt: int, max_len: int, steps: int,
                   audio: bool = True) -> dict:
        """Kind -> the compiled program serving requests of `windows` windows (a window bucket; `audio=False`: a
        question without audio, padded to that bucket) and prompt bucket `prompt` on `slots` slots of `max_len`
        positions for a model computing in `dtype`, from abstract arguments (`state` may hold
        `jax.ShapeDtypeStruct`s): what `plan` measures, and what a background compilation prepares."""
        config = self.config
        spec = jax.ShapeDtypeStruct
        one = lambda shape, dtype: spec(shape, dtype)  # noqa: E731
        if audio:
            media_kind, media_args, media_statics = "encode", (
                state, one((1, windows, config.audio.window_samples), jnp.float32), one((1, windows), jnp.float32)), {}
        else:
            media_kind, media_args, media_statics = "blank", (state,), dict(
                windows=windows, tokens_per_window=config.htsat.tokens_per_window,
                media_dim=config.audio_transformer.d_model, dtype=dtype)
        media_kv, media_mask = jax.eval_shape(functools.partial(globals()[self.FUNCTIONS[media_kind]],
                                                                graphdef=self.graphdef, **media_statics), *media_args)
        keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 1))
        sampling = (one((1,), jnp.float32), one((1,), jnp.int32), one((1,), jnp.float32), keys,
                    one((1,), jnp.int32), one((1, 1 + MAX_STOP_IDS), jnp.int32))
        prefill_args = (state, media_kv, media_mask, one((1, prompt), jnp.int32), one((1,), jnp.int32), sampling)
        group_statics = dict(slots=slots, windows=windows, max_len=max_len,
                             tokens_per_window=config.htsat.tokens_per_window,
                             media_dim=config.audio_transformer.d_model, dtype=dtype)
        group = jax.eval_shape(functools.partial(_empty_group, graphdef=self.graphdef, **group_statics), state)
        row = jax.eval_shape(functools.partial(_prefill, graphdef=self.graphdef, max_len=max_len), *prefill_args)
        return {media_kind: self.compiled(media_kind, media_args, **media_statics),
                "group": self.compiled("group", (state,), **group_statics),
                "prefill": self.compiled("prefill", prefill_args, max_len=max_len),
                "insert": self.compiled("insert", (state, group, row, one((), jnp.int32))),
                "decode": self.compiled("decode", (state, group), steps=steps)}



class _Slots:
    """One window group: its device state and which request holds each row."""

    def __init__(self, windows: int, state: Group):
        self.windows, self.state = windows, state
        self.rows: list[Handle | None] = [None] * state.last.shape[0]


def _to_host(x) -> np.ndarray:
    """A device array on the host; on a mesh spanning processes every process gets the whole array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


class Engine:
    """Serves requests on one model with continuous batching (module docstring).

    `slots`: requests decoding at once; `max_len`: each slot's text cache (prompt + new tokens); `max_pending`:
    requests that may wait for a slot before `submit` raises `EngineFull`; `mesh`: the mesh the model was loaded on
    (`slots` must split over its data x fsdp axes); `steps_per_call`: decoding steps per compiled call;
    `elastic_rows`: whether the group's rows follow the requests in flight (`row_buckets`; default: on the CPU only).

    Nothing runs in the background but what `compile_serving_form` starts: `Handle.result()` and `run` drive the
    engine from the calling thread (one thread at a time; the others wait for their results), so a process that
    submits the same requests in the same order makes the same decisions, which is what a mesh spanning processes
    needs."""

    def __init__(self, model, tokenizer=None, *, slots: int = 8, max_len: int = 768, max_pending: int = 64,
                 mesh=None, steps_per_call: int = 8, max_windows: int | None = None,
                 elastic_rows: bool | None = None):
        if slots < 1 or max_len < 2 or max_pending < 1 or steps_per_call < 1:
            raise ValueError(f"slots {slots}, max_len {max_len}, max_pending {max_pending}, steps_per_call "
                             f"{steps_per_call}: need slots >= 1, max_len >= 2, max_pending >= 1, steps >= 1")
        if mesh is not None:
            check_batch_splits(mesh, slots, "slots", fix="use a multiple of {data} slots")
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.max_windows = max_windows or model.config.audio.max_windows
        check_max_windows(self.max_windows, "max_windows=")
        self.slots, self.max_len, self.max_pending, self.mesh = slots, max_len, max_pending, mesh
        self.steps_per_call = steps_per_call
        elastic = jax.default_backend() == "cpu" if elastic_rows is None else elastic_rows
        self.row_buckets = row_buckets(slots, data_parallel_size(mesh), elastic)
        self.graphdef, self.state = nnx.split(model)
        self.programs = EnginePrograms(self.graphdef, self.config, mesh=mesh, announce=self._announce)
        # Seconds spent (compiling apart) and tokens made, over the engine's life: callers take differences.
        self.timings = {"compile_s": 0.0, "encode_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "tokens": 0}
        self._group: _Slots | None = None  # the rows decoding now; None while nothing is in flight
        self._pending: collections.deque[Handle] = collections.deque()
        self._active = 0
        self._submitted = 0
        self._announced, self._admitted, self._shapes = False, 0, (0, 0, 0)  # for the compile line of a step
        self._lock = threading.Lock()  # the queue and the handles' flags
        self._driving = threading.Lock()  # one thread steps the engine at a time
        self._compiling: threading.Thread | None = None  # compile_serving_form's thread
        self._stop_compiling = threading.Event()
        self._serving_form: EnginePrograms | None = None  # compiled in the background, not switched to yet
        self._compile_s_waited = 0.0  # seconds serving waited for compilations, before the switch
        self.switched = threading.Event()  # set once the engine serves from the programs compiled in the background

    # --- the public side ----------------------------------------------------------------------------------------
    def submit(self, request: Request, on_token: Callable[[list[int]], None] | None = None,
               on_done: Callable[[Completion], None] | None = None) -> Handle:
        """Queues a request (its prompt is tokenised and its audio read here, in the caller's thread) and returns its
        handle. `on_token(tokens)` receives its new tokens as they are decoded and `on_done(completion)` its end,
        from the thread driving the engine. Raises ValueError for a request that cannot be served and EngineFull
        when `max_pending` requests wait already."""
        turns = []
        for audio, question, answer in request.history:
            question, audio = _parts(question, audio)
            turns.append((self._clips(audio), question, answer))
        prompt, audio = _parts(request.prompt, request.audio)
        clips = self._clips(audio)
        notes: list[str] = []
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs the engine's tokenizer: Engine(model, tokenizer)")
            prompt_ids = self.tokenizer.prompt_ids(prompt, len(clips), [(len(c), q, a) for c, q, a in turns],
                                                   notes=notes)
        elif turns:
            raise ValueError("history needs a text prompt: prompt ids are used as they are")
        else:
            prompt_ids = [int(i) for i in prompt]
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        need = len(prompt_ids) + request.sampling.max_new_tokens
        if need > self.max_len:
            raise DoesNotFit(len(prompt_ids), request.sampling.max_new_tokens, self.max_len)
        every = [clip for c, _, _ in turns for clip in c] + clips
        windows = np.concatenate([w for w, _ in every]) if every else \
            np.zeros((0, self.config.audio.window_samples), np.float32)
        window_mask = np.concatenate([m for _, m in every]) if every else np.zeros((0,), np.float32)
        if windows.shape[0] > MAX_WINDOWS_LIMIT:
            raise TooMuchAudio(windows.shape[0])
        with self._lock:
            if len(self._pending) >= self.max_pending:
                raise EngineFull(f"{len(self._pending)} requests are already waiting (max_pending "
                                 f"{self.max_pending}); retry later")
            self._submitted += 1
            handle = Handle(self, request, prompt_ids, windows, window_mask, on_token, on_done, self._submitted, notes)
            self._pending.append(handle)
        for note in notes:
            log.warning(note)
        return handle

    def cancel(self, handle: Handle) -> None:
        """Ends a request at the next step; its slot is free then and its result says "cancelled"."""
        with self._lock:
            handle.cancelled = True

    def run(self, requests: Sequence[Request], on_token: Callable[[int, list[int]], None] | None = None,
            on_done: Callable[[int, Completion], None] | None = None) -> list[Completion]:
        """Serves `requests` and returns their completions in order. They are submitted as the queue has room;
        `on_token(i, tokens)` streams request i and `on_done(i, completion)` is called as it finishes."""
        handles = [self.submit_when_room(request, None if on_token is None else functools.partial(on_token, i),
                                         None if on_done is None else functools.partial(on_done, i))
                   for i, request in enumerate(requests)]
        return [handle.result() for handle in handles]

    def submit_when_room(self, request: Request, on_token: Callable[[list[int]], None] | None = None,
                         on_done: Callable[[Completion], None] | None = None) -> Handle:
        """`submit`, first driving the engine from this thread while `max_pending` requests wait: for a caller that
        feeds many requests and drives the engine itself (`run`, manifest and evaluation runs)."""
        while len(self._pending) >= self.max_pending:
            self._drive(None)
        return self.submit(request, on_token, on_done)

    def compile_serving_form(self, shapes: Sequence[tuple[int, int, int]],
                             on_ready: Callable[[], None] | None = None) -> threading.Thread:
        """Serves from the stacked form while the serving (list) form compiles: the first answers wait for the
        stacked form's programs, which compile several times faster (one layer's code instead of every layer's),
        instead of the list form's, which decode faster. Compiles, on a thread of its own, the list form's programs
        for `shapes`, `(windows, prompt bucket, rows)` each (0 windows: a question without audio; `rows_for` gives
        the rows of a group of so many requests), then calls `on_ready()`; at its next step the engine moves its
        model's layers (in place) and the caches of the requests in flight to the list form and serves on from those
        programs (`switched` is set then). Shapes not listed compile on first use, as always.

        Once per engine, for a model in the stacked form on one device in one process: the processes of a mesh must
        switch at the same step, which a background thread cannot promise. The move needs the memory of the largest
        stacked parameter or stacked cache array (every layer's K, or V) more (`plan` says how much); a failure
        during it (out of memory) leaves the model unusable. `stop_compiling` ends the thread after the shape it is
        compiling. Returns the thread."""
        if not self.model.scan_layers:
            raise ValueError("the model's layers are in the list form (the serving form) already")
        if self.mesh is not None or jax.process_count() > 1:
            raise ValueError("compiling the serving form in the background needs one device in one process (the "
                             "processes of a mesh must switch at the same step); load the model with "
                             "scan_layers=False instead")
        if self._compiling is not None:
            raise ValueError("this engine compiles its serving form once, and has started already")
        if not shapes:
            raise ValueError("no shapes to compile the serving form for")
        self._compiling = threading.Thread(target=self._compile_serving_form, args=(list(shapes), on_ready),
                                           name="af2-compile", daemon=True)
        self._compiling.start()
        return self._compiling

    def stop_compiling(self) -> None:
        """Ends `compile_serving_form`'s thread after the shape it is compiling (the engine then never switches)."""
        self._stop_compiling.set()

    @property
    def compiling(self) -> bool:
        """Whether `compile_serving_form`'s thread is compiling."""
        return self._compiling is not None and self._compiling.is_alive()

    @property
    def switch_pending(self) -> bool:
        """Whether the serving form's programs are compiled and the engine's next step switches to them."""
        return self._serving_form is not None

    @property
    def idle(self) -> bool:
        return not self._pending and self._active == 0

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._pending)

    @property
    def busy(self) -> int:
        """Slots holding a request (being prefilled or decoding)."""
        return self._active

    @property
    def rows(self) -> int:
        """Rows of the slot group now (a row bucket; 0 while nothing is in flight)."""
        return 0 if self._group is None else len(self._group.rows)

    # --- the driving side ---------------------------------------------------------------------------------------
    def _drive(self, finished: threading.Event | None) -> None:
        """One step from this thread, unless another thread is stepping (then wait a moment for it)."""
        if self._driving.acquire(timeout=0.05):
            try:
                if finished is None or not finished.is_set():
                    self.step()
            finally:
                self._driving.release()

    def step(self) -> bool:
        """Ends cancelled requests, admits waiting ones into free slots (encode, prefill, insert), then runs one
        decoding call for every group with running rows. Returns whether there was anything to do (switching to
        the serving form's programs, when they are ready, comes first and counts)."""
        switching = self._serving_form is not None
        if switching:
            self._switch()
        group = self._group
        for row, handle in enumerate(group.rows if group is not None else []):
            if handle is not None and handle.cancelled:
                group.state = group.state._replace(running=group.state.running.at[row].set(False))
                self._free(row)
                self._finish(handle, "cancelled")
        with self._lock:
            for handle in [h for h in self._pending if h.cancelled]:
                self._pending.remove(handle)
                self._finish(handle, "cancelled")
            admitted = [self._pending.popleft() for _ in range(min(self.slots - self._active, len(self._pending)))]
            self._active += len(admitted)
        self._announced = False
        self._admitted = len(admitted)
        self._fit(len(admitted))
        for handle in admitted:
            self._start(handle)
        decoded = self._group is not None
        if decoded:
            self._decode()
        self.timings["compile_s"] = self._compile_s_waited + self.programs.compile_s
        return switching or bool(admitted) or decoded

    def _compile_serving_form(self, shapes: list[tuple[int, int, int]], on_ready) -> None:
        start = time.perf_counter()
        try:
            graphdef, state = nnx.split(abstract_relayout(self.model, scan_layers=False))
            programs = EnginePrograms(graphdef, self.config, capacity=self.programs.capacity)
            for windows, prompt, rows in shapes:
                if self._stop_compiling.is_set():
                    return
                programs.for_shapes(state, dtype=self.model.dtype, slots=rows, windows=bucket_windows(windows),
                                    prompt=prompt, max_len=self.max_len, steps=self.steps_per_call,
                                    audio=windows > 0)
        except Exception:  # noqa: BLE001  (serving goes on from the stacked form, which works)
            log.exception("compiling the serving form in the background failed; serving goes on from the stacked "
                          "form")
            return
        log.info("serving form compiled in the background: %d programs in %.1f s; switching at the next step",
                 programs.count, time.perf_counter() - start)
        self._serving_form = programs
        if on_ready is not None:
            on_ready()

    def _switch(self) -> None:
        """The model's layers, and the caches of the requests in flight, moved to the list form; the programs
        compiled for it in the background serve from now on."""
        programs, self._serving_form = self._serving_form, None
        group = self._group
        if group is not None:
            group.state = group.state._replace(cache=stacked_to_list(group.state.cache),
                                               media_kv=stacked_to_list(group.state.media_kv))
        relayout(self.model, scan_layers=False)
        self.graphdef, self.state = nnx.split(self.model)
        # Serving waited for the stacked form's compilations, not for the background's.
        self._compile_s_waited += self.programs.compile_s - programs.compile_s
        self.programs, programs.announce = programs, self._announce
        self.switched.set()
        log.info("serving from the serving form's programs now")

    def _start(self, handle: Handle) -> None:
        sampling = handle.request.sampling
        windows = bucket_windows(handle.windows.shape[0])
        audio = np.zeros((1, windows, handle.windows.shape[1]), np.float32)
        audio_mask = np.zeros((1, windows), np.float32)
        audio[0, :handle.windows.shape[0]] = handle.windows
        audio_mask[0, :handle.windows.shape[0]] = handle.window_mask
        length = len(handle.prompt_ids)
        prompt = min(bucket_prompt(length), self.max_len)
        self._shapes = windows, prompt, sampling.max_new_tokens
        if handle.windows.shape[0]:
            media_kv, media_mask = self._timed("encode_s", "encode", (self.state, audio, audio_mask))
        else:  # no audio: masked zeros for the K/V, and no HTSAT pass (the attention output is then exactly zero)
            media_kv, media_mask = self._timed("encode_s", "blank", (self.state,), windows=windows,
                                               tokens_per_window=self.config.htsat.tokens_per_window,
                                               media_dim=self.config.audio_transformer.d_model,
                                               dtype=self.model.dtype)
        ids = np.full((1, prompt), self.config.tokens.pad, np.int32)
        ids[0, :length] = handle.prompt_ids
        stops = self._stops(sampling)
        stop = np.full((1, 1 + MAX_STOP_IDS), -1, np.int32)
        stop[0, :len(stops)] = stops
        greedy = sampling.greedy
        row_sampling = (np.asarray([0.0 if greedy else sampling.temperature], np.float32),
                        np.asarray([sampling.top_k or 0], np.int32), np.asarray([sampling.top_p or 1.0], np.float32),
                        jax.random.key(sampling.seed)[None],
                        np.asarray([sampling.max_new_tokens], np.int32), stop)
        row = self._timed("prefill_s", "prefill", (self.state, media_kv, media_mask, ids,
                                                    np.asarray([length], np.int32), row_sampling), max_len=self.max_len)
        group = self._widened(windows)
        slot = group.rows.index(None)
        group.state = self._timed("prefill_s", "insert", (self.state, group.state, row, np.int32(slot)))
        group.rows[slot] = handle

    def _timed(self, phase: str, kind: str, args, **statics):
        """Runs a program to completion, adding its seconds (its compilation apart) to `timings[phase]`."""
        start, compiled = time.perf_counter(), self.programs.compile_s
        out = jax.block_until_ready(self.programs.run(kind, args, **statics))
        self.timings[phase] += time.perf_counter() - start - (self.programs.compile_s - compiled)
        return out

    def _widened(self, windows: int) -> _Slots:
        """The group, made (or widened to) at least `windows` windows wide."""
        group = self._group
        if group is None:
            statics = dict(slots=self.rows_for(self._active), windows=windows, max_len=self.max_len,
                           tokens_per_window=self.config.htsat.tokens_per_window,
                           media_dim=self.config.audio_transformer.d_model, dtype=self.model.dtype)
            group = self._group = _Slots(windows, self.programs.run("group", (self.state,), **statics))
        elif group.windows < windows:
            self._resize(windows)
        return group

    def _resize(self, windows: int) -> None:
        group = self._group
        group.state = self.programs.run("resize", (self.state, group.state),
                                        tokens=windows * self.config.htsat.tokens_per_window)
        group.windows = windows

    def _decode(self) -> None:
        group = self._group
        group.state, out = self._timed("decode_s", "decode", (self.state, group.state), steps=self.steps_per_call)
        out, running = _to_host(out), _to_host(group.state.running)
        for row, handle in enumerate(group.rows):
            if handle is None:
                continue
            self._emit(handle, [int(t) for t in out[row] if t >= 0])
            if not running[row]:
                self._free(row)
                self._finish(handle, self._reason(handle))
        self._fit(min(len(self._pending), self.slots - self._active))

    def _free(self, row: int) -> None:
        self._group.rows[row] = None
        with self._lock:
            self._active -= 1

    def _fit(self, incoming: int) -> None:
        """The group fitted to the requests it holds and `incoming` more: as many rows as the smallest row bucket
        holding them all (the held rows first, in their order), as wide as the widest held request; gone when none
        is held or coming (its memory goes back until the next request)."""
        group = self._group
        if group is None:
            return
        held = [row for row, handle in enumerate(group.rows) if handle is not None]
        if not held and not incoming:
            self._group = None
            return
        widest = max((bucket_windows(group.rows[row].windows.shape[0]) for row in held), default=0)
        rows = self.rows_for(len(held) + incoming)
        if rows != len(group.rows):
            take = np.asarray(held + [-1] * (rows - len(held)), np.int32)
            group.state = self.programs.run("regroup", (self.state, group.state, take))
            group.rows = [group.rows[row] for row in held] + [None] * (rows - len(held))
        if 0 < widest < group.windows:
            self._resize(widest)

    def rows_for(self, count: int) -> int:
        """The rows of a group holding `count` requests: the smallest row bucket that holds them."""
        return next(rows for rows in self.row_buckets if rows >= count)

    def _emit(self, handle: Handle, tokens: list[int]) -> None:
        if not tokens:
            return
        handle.tokens.extend(tokens)
        self.timings["tokens"] += len(tokens)
        if handle.on_token is not None:
            handle.on_token(tokens)

    def _stops(self, sampling: Sampling) -> tuple[int, ...]:
        return (*(() if sampling.ignore_eos else (self.config.tokens.eos,)), *sampling.stop_ids)

    def _reason(self, handle: Handle) -> str:
        stops = self._stops(handle.request.sampling)
        return "stop" if handle.tokens and handle.tokens[-1] in stops else "length"

    def _finish(self, handle: Handle, reason: str) -> None:
        text = None
        if isinstance(handle.request.prompt, str) and self.tokenizer is not None:
            text = self.tokenizer.answer(handle.prompt_ids, handle.tokens)
        handle.completion = Completion(list(handle.tokens), reason, handle.prompt_ids, text)
        handle._finished.set()
        if handle.on_done is not None:
            handle.on_done(handle.completion)

    def _announce(self, kind: str) -> None:
        """One line before the first compilation of a step, naming the shapes of the request that needs it (compiling
        takes long enough to look like a hang: minutes for the release on a GPU)."""
        if not self._announced:
            windows, prompt, new = self._shapes
            log.info("compiling for %d row(s) x %d window(s), prompt %d + %d new tokens (%s)", self._admitted, windows,
                     prompt, new, compile_note())
            self._announced = True

    def _clips(self, audio) -> list[tuple[np.ndarray, np.ndarray]]:
        """The clips of a request's `audio` (`Request`) as `(windows, mask)` pairs."""
        if audio is None:
            return []
        if isinstance(audio, list):
            return [clip for item in audio for clip in self._clips(item)]
        if isinstance(audio, tuple):
            windows, mask = (np.asarray(a, np.float32) for a in audio)
            if windows.ndim != 2 or mask.shape != windows.shape[:1] or windows.shape[0] < 1:
                raise ValueError(f"audio windows {windows.shape} and mask {mask.shape}: need (W, samples) and (W,), "
                                 "W >= 1")
            return [(windows, mask)]
        if isinstance(audio, dict):
            return [waveform_windows(audio, self.max_windows, config=self.config.audio)]
        return [load_windows(audio, max_windows=self.max_windows, config=self.config.audio)]


def _parts(prompt, audio):
    """(question or ids, audio) of a request: a list of `{"text"}` / `{"audio"}` parts becomes its texts joined with
    one space and its clips, in order, ahead of `audio`'s."""
    if not (isinstance(prompt, list) and prompt and all(isinstance(part, dict) for part in prompt)):
        return prompt, audio
    texts, clips = [], []
    for part in prompt:
        if set(part) == {"text"} and isinstance(part["text"], str):
            texts.append(part["text"])
        elif set(part) == {"audio"}:
            clips += part["audio"] if isinstance(part["audio"], list) else [part["audio"]]
        else:
            raise ValueError(f'a prompt part is {{"text": str}} or {{"audio": clip}}, got {str(part)[:60]}')
    more = [] if audio is None else audio if isinstance(audio, list) else [audio]
    return " ".join(texts), clips + more


def compile_note() -> str:
    """Where compiled programs are kept between processes, for the compile line."""
    folder = jax.config.jax_compilation_cache_dir
    if folder:
        return f"first run only; cached in {folder}"
    return "once per process: JAX's compilation cache is off"
