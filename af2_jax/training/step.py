"""The train step: masked shifted cross-entropy, a trainable subset chosen by preset or regex, AdamW with warmup,
per-module or global gradient clipping, gradient accumulation, all in one jitted function over donated state.

The model splits once into (graphdef, trainable params, frozen state). Only trainable parameters have optimizer
state; frozen ones are passed through untouched. Parameters are float32 master weights; the model's compute dtype
(bfloat16 in the recipes) is applied by each layer as it runs.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from af2_jax.training.config import ConfigError, OptimSection
from af2_jax.training.labels import IGNORE

# Trainable sets of the original recipes (docs/original.md#training-recipe), as regexes over NNX parameter paths.
TRAINABLE_PRESETS = {
    "pretrain": r"^(audio_transformer|layers\.xattn|embed_tokens)\.",
    "sft": r"^(audio_encoder|audio_transformer|layers\.xattn|embed_tokens)\.",
    "full": r".",
}


def path_str(path) -> str:
    return ".".join(str(k) for k in path)


def trainable_filter(spec: str):
    """An NNX filter selecting the trainable parameters. BatchNorm statistics are never trained: the encoder always
    runs in its evaluation form (docs/original.md#encoder-train-mode)."""
    try:
        pattern = re.compile(TRAINABLE_PRESETS.get(spec, spec))
    except re.error as err:
        raise ConfigError(f"optim.trainable {spec!r} is neither a preset ({', '.join(TRAINABLE_PRESETS)}) nor a "
                          f"valid regex ({err})") from None
    return lambda path, value: isinstance(value, nnx.Param) and bool(pattern.search(path_str(path)))


def split_model(model, trainable: str):
    """`(graphdef, trainable params, frozen state)`; an empty trainable set is an error."""
    graphdef, params, frozen = nnx.split(model, trainable_filter(trainable), ...)
    if not jax.tree.leaves(params):
        raise ConfigError(f"optim.trainable {trainable!r} selects no parameter; use pretrain, sft, full or a regex "
                          "over paths such as layers.xattn or embed_tokens")
    return graphdef, params, frozen


def schedule(optim: OptimSection, total_steps: int):
    """Linear warmup from 0 (as transformers' schedules, step 0 has rate 0), then constant or cosine."""
    warm = optax.linear_schedule(0.0, optim.learning_rate, max(optim.warmup_steps, 1))
    if optim.schedule == "constant":
        after = optax.constant_schedule(optim.learning_rate)
    else:
        after = optax.cosine_decay_schedule(optim.learning_rate, max(total_steps - optim.warmup_steps, 1),
                                            alpha=optim.end_learning_rate / optim.learning_rate)
    if optim.warmup_steps == 0:
        return after
    return optax.join_schedules([warm, after], [optim.warmup_steps])


def optimizer(optim: OptimSection, total_steps: int) -> optax.GradientTransformation:
    """AdamW with torch's defaults and uniform decoupled weight decay (docs/original.md#weight-decay); clipping
    happens before it."""
    return optax.adamw(schedule(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.weight_decay)


# --- clipping ---------------------------------------------------------------------------------------------------
def clip_group(path: str) -> str:
    """The original clips these separately (docs/original.md#clipping): the audio encoder, the audio transformer,
    every cross-attention block, the embedding. Stacked LM layers (`layers.*`) form one group per layer (handled by
    the leading axis)."""
    parts = path.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


def clip_gradients(grads, mode: str, max_norm: float):
    """Scales gradient groups whose L2 norm exceeds `max_norm` (torch's `clip_grad_norm_`: coefficient
    `max_norm / (norm + 1e-6)`, capped at 1). Returns (clipped grads, global norm before clipping)."""
    flat = {path_str(p): g for p, g in nnx.to_flat_state(grads)}
    squares = {p: jnp.sum(jnp.square(g[...].astype(jnp.float32)),
                          axis=tuple(range(1 if p.startswith("layers.") else 0, g.ndim))) for p, g in flat.items()}
    global_norm = jnp.sqrt(sum(jnp.sum(s) for s in squares.values()))
    if mode == "none":
        return grads, global_norm
    if mode == "global":
        scale = jnp.minimum(1.0, max_norm / (global_norm + 1e-6))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads), global_norm
    groups: dict[str, Any] = {}
    for p, s in squares.items():
        groups[clip_group(p)] = groups.get(clip_group(p), 0.0) + s
    scales = {k: jnp.minimum(1.0, max_norm / (jnp.sqrt(v) + 1e-6)) for k, v in groups.items()}

    def scaled(path, var):
        s = scales[clip_group(path_str(path))]
        g = var[...]
        return var.replace((g * s.reshape(s.shape + (1,) * (g.ndim - s.ndim))).astype(g.dtype))

    return nnx.map_state(scaled, grads), global_norm


# --- loss -------------------------------------------------------------------------------------------------------
def cross_entropy(model, batch, *, remat: bool = False, loss_positions: int = 0, dropout_key=None):
    """transformers' shifted cross-entropy: logits at t predict labels at t+1, mean over labels != -100.
    Returns (sum of token losses, number of labelled tokens)."""
    media, media_mask = model.encode_audio(batch["audio_x"], batch["audio_x_mask"], dropout_key)
    return text_cross_entropy(model, media, media_mask, batch, remat=remat, loss_positions=loss_positions)


def text_cross_entropy(model, media, media_mask, batch, *, remat: bool = False, loss_positions: int = 0):
    """`cross_entropy` from already encoded media."""
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], media, media_mask, remat=remat)[0]
    hidden, targets = hidden[:, :-1], batch["labels"][:, 1:]
    valid = targets != IGNORE
    if loss_positions:
        # The first `loss_positions` labelled positions of each row (stable sort keeps their order).
        order = jnp.argsort(~valid, axis=1, stable=True)[:, :loss_positions]
        hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
        targets = jnp.take_along_axis(targets, order, axis=1)
        valid = jnp.take_along_axis(valid, order, axis=1)
    logits = model.logits(hidden)
    safe = jnp.where(valid, targets, 0)
    token_loss = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, token_loss, 0.0)), jnp.sum(valid)


class TrainState(NamedTuple):
    """What the train step carries from one step to the next (donated)."""

    params: Any  # trainable parameters (nnx.State), float32
    opt_state: Any
    step: jax.Array


class StepMetrics(NamedTuple):
    """One optimizer step's scalars: the loss (mean over micro-batches of each one's mean token loss), the global
    gradient norm before clipping, the labelled tokens and the learning rate used."""

    loss: jax.Array
    grad_norm: jax.Array
    tokens: jax.Array
    learning_rate: jax.Array


def make_train_step(graphdef, tx: optax.GradientTransformation, optim: OptimSection, *, remat: bool = False,
                    seed: int = 0, lr_schedule=None):
    """`step(state, frozen, batch) -> (state, metrics)`. The batch holds `grad_accum` micro-batches stacked on the
    leading axis; each micro-batch's loss is its own mean, divided by `grad_accum` (as the original)."""
    accum = optim.grad_accum

    def micro_loss(params, frozen, micro, key):
        model = nnx.merge(graphdef, params, frozen)
        total, count = cross_entropy(model, micro, remat=remat, loss_positions=optim.loss_positions,
                                     dropout_key=key if optim.attn_dropout > 0 else None)
        return total / jnp.maximum(count, 1) / accum, count


    def step(state: TrainState, frozen, batch):
        micro_batches = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)
        base_key = jax.random.fold_in(jax.random.key(seed), state.step)

        def accumulate(carry, inputs):
            grads, loss, tokens, norm = carry
            index, micro = inputs
            key = jax.random.fold_in(base_key, index)
            (micro_value, count), micro_grads = jax.value_and_grad(micro_loss, has_aux=True)(
                state.params, frozen, micro, key)
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            if optim.clip_every_microstep:
                grads, norm = clip_gradients(grads, optim.clip, optim.max_grad_norm)
            return (grads, loss + micro_value, tokens + count, norm), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        carry = (zeros, jnp.float32(0), jnp.int32(0), jnp.float32(0))
        (grads, loss, tokens, grad_norm), _ = jax.lax.scan(accumulate, carry, (jnp.arange(accum), micro_batches))
        if not optim.clip_every_microstep:
            grads, grad_norm = clip_gradients(grads, optim.clip, optim.max_grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        lr = lr_schedule(state.step) if lr_schedule is not None else jnp.nan
        return TrainState(params, opt_state, state.step + 1), StepMetrics(loss, grad_norm, tokens, jnp.float32(lr))

    return step


def make_eval_step(graphdef, optim: OptimSection):
    """`eval(params, frozen, batch) -> (sum of token losses, labelled tokens)`, no dropout."""

    def evaluate(params, frozen, batch):
        model = nnx.merge(graphdef, params, frozen)
        return cross_entropy(model, batch, loss_positions=optim.loss_positions)

    return evaluate
