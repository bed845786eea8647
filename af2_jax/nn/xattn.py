"""Gated cross-attention from text to audio (docs/original.md#cross-attention), one block before each decoder layer.

As in the reference inference code of the released weights, every text position sees every unmasked audio token of
its row (no media-location mask: docs/original.md#no-media-mask). Keys and values come from the un-normalised
audio; padded audio tokens are set to -float_max before a max-subtracted softmax. `media_kv` is separate so a sampler
can compute K/V once per request and reuse them at every decoding step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from af2_jax.config import CrossAttentionConfig
from af2_jax.nn.layers import layer_norm, linear, named


class GatedCrossAttention(nnx.Module):
    """Text `x` `(B, T, dim)` attends to the audio; returns `(B, T, dim)` in x's dtype. `media_kv(media)`: media
    `(B, S, media_dim)` -> K, V `(B, heads, S, dim_head)`; `__call__(x, K, V, media_mask)` with `media_mask` `(B, S)`
    (nonzero = real audio). Logits and softmax in float32; `attn_gate` and `ff_gate` are `(1,)` parameters."""

    def __init__(self, dim: int, media_dim: int, cfg: CrossAttentionConfig, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        inner = cfg.heads * cfg.dim_head
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = layer_norm(dim, axis_name="embed", eps=cfg.layer_norm_eps, **kw)
        self.to_q = linear(dim, inner, axes=("embed", "xattn_heads"), use_bias=False, **kw)
        # One (media_dim, 2 * inner) kernel as in the original: columns [0, inner) are K, [inner, 2 inner) are V.
        self.to_kv = linear(media_dim, 2 * inner, axes=("audio_embed", "xattn_kv"), use_bias=False, **kw)
        self.to_out = linear(inner, dim, axes=("xattn_heads", "embed"), use_bias=False, **kw)
        gate = named(nnx.initializers.constant(cfg.gate_init), (None,))
        self.attn_gate = nnx.Param(gate(rngs.params(), (1,), param_dtype))
        self.ff_norm = layer_norm(dim, axis_name="embed", eps=cfg.layer_norm_eps, **kw)
        self.ff_in = linear(dim, cfg.ff_mult * dim, axes=("embed", "mlp"), use_bias=False, **kw)
        self.ff_out = linear(cfg.ff_mult * dim, dim, axes=("mlp", "embed"), use_bias=False, **kw)
        self.ff_gate = nnx.Param(gate(rngs.params(), (1,), param_dtype))

    def media_kv(self, media):
        """media `(B, S, media_dim)` -> K, V `(B, heads, S, dim_head)`: head-major, the layout the attention reads,
        so a decoding step never transposes them."""
        b, s, _ = media.shape
        kv = self.to_kv(media).reshape(b, s, 2, self.cfg.heads, self.cfg.dim_head).transpose(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def __call__(self, x, media_k, media_v, media_mask):
        """x `(B, T, dim)`; media K/V `(B, heads, S, dim_head)`; media_mask `(B, S)` (nonzero = real audio)."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.to_q(self.norm(x)).reshape(b, t, cfg.heads, cfg.dim_head).transpose(0, 2, 1, 3)
        q = q * jnp.asarray(cfg.dim_head ** -0.5, q.dtype)
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, media_k).astype(jnp.float32)
        logits = jnp.where(media_mask[:, None, None, :] != 0, logits, -jnp.finfo(jnp.float32).max)
        logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
        probs = jax.nn.softmax(logits, axis=-1).astype(media_v.dtype)
        attn = jnp.einsum("bhqk,bhkd->bqhd", probs, media_v).reshape(b, t, cfg.heads * cfg.dim_head)
        # A row without audio attends to nothing: its attention output is exactly zero (the original, which never
        # saw such a row, would spread the attention evenly over padding: docs/original.md#text-only).
        attn = jnp.where(jnp.any(media_mask != 0, axis=-1)[:, None, None], attn, 0)
        x = x + jnp.tanh(self.attn_gate[...]).astype(x.dtype) * self.to_out(attn)
        ff = self.ff_out(jax.nn.gelu(self.ff_in(self.ff_norm(x)), approximate=False))
        return x + jnp.tanh(self.ff_gate[...]).astype(x.dtype) * ff
