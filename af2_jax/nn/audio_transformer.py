"""The audio transformer (`audio_transformer_clap`, docs/original.md#audio-transformer): post-LN encoder layers over
all audio tokens of a clip, rotary positions along the global token axis (docs/original.md#rotary-positions).

Literal to the original: the input is scaled by sqrt(d_model) and then LayerNorm'ed
(docs/original.md#scale-then-norm); attention has no biases; rotary (base 4096, "rotate half") covers the first
`max(d_head // 2, 32)` channels of each head (docs/original.md#rotary-partial); keys of masked windows are
overwritten with -1e9 before the softmax (docs/original.md#mask-fill-values), so a row with every key masked attends
uniformly instead of NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from af2_jax.config import AudioTransformerConfig
from af2_jax.nn.buffers import rotary_inv_freq
from af2_jax.nn.layers import layer_norm, linear


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rotary_cos_sin(positions, dim: int, base: float):
    """cos/sin tables `(..., len, dim)` in float32 for integer `positions` `(..., len)`."""
    angles = positions.astype(jnp.float32)[..., None] * rotary_inv_freq(dim, base)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x, cos, sin):
    """Rotates the first `cos.shape[-1]` channels of `x` `(B, S, H, d)` in float32; the rest pass through.
    `cos`/`sin`: `(B or 1, S, dim)`."""
    dim = cos.shape[-1]
    rot = x[..., :dim].astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rot = (rot * cos + rotate_half(rot) * sin).astype(x.dtype)
    return rot if dim == x.shape[-1] else jnp.concatenate([rot, x[..., dim:]], axis=-1)


class EncoderLayer(nnx.Module):
    """One post-LN layer: self-attention with partial rotary, then a ReLU FFN, each added to its input and
    LayerNorm'ed. `(B, S, D)` -> `(B, S, D)` in the module's dtype; logits and softmax in float32."""

    def __init__(self, cfg: AudioTransformerConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.d_model
        proj = functools.partial(linear, d, d, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.w_qs = proj(axes=("audio_embed", "audio_heads"))
        self.w_ks = proj(axes=("audio_embed", "audio_heads"))
        self.w_vs = proj(axes=("audio_embed", "audio_heads"))
        self.fc = proj(axes=("audio_heads", "audio_embed"))
        norm = functools.partial(layer_norm, d, axis_name="audio_embed", eps=cfg.layer_norm_eps, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = norm()
        self.w_1 = linear(d, cfg.d_inner, axes=("audio_embed", "audio_mlp"), dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)
        self.w_2 = linear(cfg.d_inner, d, axes=("audio_mlp", "audio_embed"), dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)
        self.ffn_norm = norm()

    def __call__(self, x, key_mask, cos, sin, dropout_key=None):
        """x `(B, S, D)`; key_mask `(B, S)` (nonzero = attend); cos/sin `(1, S, rotary_dim)`. With a
        `dropout_key`, attention probabilities are dropped at `cfg.attn_dropout` (train mode,
        docs/original.md#attn-dropout)."""
        cfg = self.cfg
        b, s, _ = x.shape
        heads = lambda t: t.reshape(b, s, cfg.n_heads, cfg.d_head)  # noqa: E731
        q = apply_rotary(heads(self.w_qs(x)), cos, sin)
        k = apply_rotary(heads(self.w_ks(x)), cos, sin)
        v = heads(self.w_vs(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q / jnp.asarray(cfg.d_head ** 0.5, q.dtype), k)
        logits = jnp.where(key_mask[:, None, None, :] != 0, logits.astype(jnp.float32), cfg.key_mask_fill)
        probs = jax.nn.softmax(logits, axis=-1)
        if dropout_key is not None and cfg.attn_dropout > 0:
            keep = jax.random.bernoulli(dropout_key, 1.0 - cfg.attn_dropout, probs.shape)
            probs = jnp.where(keep, probs / (1.0 - cfg.attn_dropout), 0.0)
        probs = probs.astype(v.dtype)
        attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, cfg.d_model)
        x = self.attn_norm(self.fc(attn) + x)
        return self.ffn_norm(self.w_2(jax.nn.relu(self.w_1(x))) + x)


class AudioTransformer(nnx.Module):
    """`(B, S, D)` audio tokens and a `(B, S)` mask (nonzero = real token) -> `(B, S, D)` media for the
    cross-attention, in the module's dtype."""

    def __init__(self, cfg: AudioTransformerConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.input_norm = layer_norm(cfg.d_model, axis_name="audio_embed", eps=cfg.layer_norm_eps, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([EncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.n_layers)])

    def __call__(self, tokens, mask, dropout_key=None):
        """`dropout_key` (train mode only) turns on the attention dropout of the original
        (docs/original.md#attn-dropout)."""
        cfg = self.cfg
        x = self.input_norm(tokens * jnp.asarray(cfg.d_model ** 0.5, tokens.dtype))
        cos, sin = rotary_cos_sin(jnp.arange(x.shape[1])[None], cfg.rotary_dim, cfg.rotary_base)
        keys = [None] * len(self.layers) if dropout_key is None else jax.random.split(dropout_key, len(self.layers))
        for layer, key in zip(self.layers, keys):
            x = layer(x, mask, cos, sin, key)
        return x
