"""Qwen2 / Qwen2.5 decoder layer (docs/original.md#qwen2-layer): RMSNorm with float32 statistics, grouped-query
attention with biases on q/k/v only, RoPE on the full head ("rotate half"), SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from af2_jax.config import LMConfig
from af2_jax.nn.audio_transformer import rotate_half
from af2_jax.nn.layers import linear, named


class RMSNorm(nnx.Module):
    """`weight * (x * rsqrt(mean(x^2) + eps))`, statistics in float32 and cast back before the weight (as HF).
    `(..., dim)` -> the same shape and dtype."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = nnx.Param(named(nnx.initializers.ones_init(), ("embed",))(rngs.params(), (dim,), param_dtype))

    def __call__(self, x):
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * h.astype(x.dtype)


def rope_cos_sin(positions, head_dim: int, theta: float):
    """cos/sin `(B, T, head_dim)` in float32 for integer positions `(B, T)`, as transformers' Qwen2 rotary."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """x `(B, T, H, d)`; cos/sin `(B, T, d)`; computed in x's dtype like transformers."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin


class Qwen2Attention(nnx.Module):
    """Grouped-query self-attention with RoPE: x `(B, T, hidden)` -> `(B, T, hidden)` in the module's dtype.
    cos/sin `(B, T, head_dim)` float32; mask `(B, T, S)` boolean (True = may attend); keys and values
    `(B, num_kv_heads, S, head_dim)` are the call's own (S = T) or a KV cache's (`cached`). Softmax in float32."""

    def __init__(self, cfg: LMConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = linear(d, cfg.num_heads * hd, axes=("embed", "q_heads"), **kw)
        self.k_proj = linear(d, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.v_proj = linear(d, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.o_proj = linear(cfg.num_heads * hd, d, axes=("q_heads", "embed"), use_bias=False, **kw)

    def project_kv(self, x, cos, sin):
        """Keys (with RoPE) and values `(B, KV, T, d)`: head-major, the KV cache's layout."""
        b, t, _ = x.shape
        k = self.k_proj(x).reshape(b, t, self.cfg.num_kv_heads, self.cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, self.cfg.num_kv_heads, self.cfg.head_dim)
        return apply_rope(k, cos, sin).transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def __call__(self, x, cos, sin, mask, kv=None):
        """x `(B, T, D)`; mask `(B, T, S)` boolean (True = may attend); kv: keys/values `(B, KV, S, d)` to attend to
        (default: this call's own, S = T)."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim), cos, sin)
        k, v = self.project_kv(x, cos, sin) if kv is None else kv
        groups = cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim).transpose(0, 2, 3, 1, 4)  # (B, KV, G, T, d)
        logits = jnp.einsum("bkgqd,bksd->bkgqs", q, k) * jnp.asarray(cfg.head_dim ** -0.5, q.dtype)
        logits = jnp.where(mask[:, None, None], logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bksd->bqkgd", probs, v).reshape(b, t, cfg.num_heads * cfg.head_dim)
        return self.o_proj(out)


    def cached(self, x, cos, sin, mask, cache_k, cache_v, index):
        """Writes this call's keys/values into the cache from position `index` on (a scalar, or one position per
        row `(B,)`) and attends over the whole cache. cache `(B, KV, S_max, d)`; mask `(B, T, S_max)`. Returns
        (output, cache_k, cache_v)."""
        k, v = self.project_kv(x, cos, sin)
        cache_k, cache_v = _write(cache_k, k, index), _write(cache_v, v, index)
        return self(x, cos, sin, mask, kv=(cache_k, cache_v)), cache_k, cache_v


def _write(cache, new, index):
    """`new` `(B, KV, T, d)` into `cache` `(B, KV, S_max, d)` at position `index` (scalar) or `index[b]` for row b."""
    new = new.astype(cache.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache, new, (0, 0, index, 0))
    return jax.vmap(lambda row, rows_new, at: jax.lax.dynamic_update_slice(row, rows_new, (0, at, 0)))(
        cache, new, index)


class Qwen2MLP(nnx.Module):
    """SwiGLU MLP without biases: `(..., hidden)` -> `(..., hidden)`."""

    def __init__(self, cfg: LMConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nnx.Module):
    """Pre-norm Qwen2 decoder layer: x `(B, T, hidden)` -> `(B, T, hidden)` in x's dtype. `__call__` attends over
    the call's own tokens under `mask` `(B, T, T)`; `cached` writes this call's keys/values into a KV cache
    `(B, num_kv_heads, S_max, head_dim)` at slot `index`, attends over it under `mask` `(B, T, S_max)` and returns
    `(x, cache_k, cache_v)`."""

    def __init__(self, cfg: LMConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = Qwen2Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype,
                                                rngs=rngs)
        self.mlp = Qwen2MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def cached(self, x, cos, sin, mask, cache_k, cache_v, index):
        attn, cache_k, cache_v = self.self_attn.cached(self.input_layernorm(x), cos, sin, mask, cache_k, cache_v,
                                                       index)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), cache_k, cache_v
