"""Weight-only int8 for serving: half the bytes a decoding step reads.

Each quantized weight matrix is stored as int8 values `q` and one float32 scale per output channel `s`:
`s = max |W[:, j]| / 127` (1 for an all-zero column) and `q = round(W / s)` in -127..127 (symmetric, no zero
point). A product computes `(x @ q) * s`: the int8 values are converted to the module's dtype inside the product
(XLA fuses the conversion into the matmul's operand on accelerators, so no dequantized copy of a weight is kept),
which accumulates in float32, where the float32 scale applies before the one rounding to the module's dtype. The
rounding error of a weight is at most half its channel's step, `s / 2`, so an output channel `j` of a product moves
by at most `s_j / 2 * sum_i |x_i|` (`tests/test_quant.py` checks this bound).

Quantized: every linear layer of the language model's decoder layers and of the cross-attention blocks (`QUANTIZED`),
and the tied embedding (its rows are the output projection's channels, so a scale per vocabulary row). The audio
encoder and the audio transformer keep the load dtype: they run once per request, not per decoded token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from af2_jax.nn.layer_stack import LayerList

QUANTIZE_MODES = ("int8",)
INT8_MAX = 127
# The linear layers of one FlamingoLayer that int8 replaces, by the submodule holding them.
QUANTIZED = {
    "xattn": ("to_q", "to_kv", "to_out", "ff_in", "ff_out"),
    "decoder.self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "decoder.mlp": ("gate_proj", "up_proj", "down_proj"),
}


def check_quantize(quantize: str | None, scan_layers: bool) -> None:
    """Refuses a quantize mode there is no rule for, and quantizing the stacked layers (int8 is for serving, which
    keeps one buffer per layer)."""
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize={quantize!r}: supported: {', '.join(QUANTIZE_MODES)} (or None)")
    if quantize and scan_layers:
        raise ValueError("quantize needs scan_layers=False: int8 weights are for serving, which keeps one buffer "
                         "per layer")


@jax.jit
def quantize_columns(weight):
    """`(in, out)` weights -> `(q int8 (in, out), scale float32 (out,))`, per output channel."""
    weight = weight.astype(jnp.float32)
    scale = jnp.max(jnp.abs(weight), axis=0) / INT8_MAX
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(weight / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def _param(value, axes: tuple):
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _axes(variable) -> tuple:
    return tuple(variable.get_metadata()["out_sharding"])


class Int8Linear(nnx.Module):
    """A linear layer with int8 weights `kernel` `(in, out)` and float32 `scale` `(out,)`: `(..., in)` -> `(...,
    out)` in `dtype`. The kernel keeps the logical axes of the weights it replaces, the scale those of their output
    axis, so the sharding rules place them as they placed the original."""

    def __init__(self, kernel, scale, bias, *, axes: tuple, dtype):
        self.kernel = _param(kernel, axes)
        self.scale = _param(scale, axes[1:])
        self.bias = bias  # the original's bias Param (or None), kept in its dtype
        self.dtype = dtype

    @classmethod
    def from_linear(cls, linear: nnx.Linear) -> Int8Linear:
        kernel, scale = quantize_columns(linear.kernel[...])
        return cls(kernel, scale, linear.bias, axes=_axes(linear.kernel), dtype=linear.dtype or jnp.float32)

    def __call__(self, x):
        # The product accumulates in float32 and the float32 scale applies there: one rounding to `dtype`, at the end.
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), preferred_element_type=jnp.float32)
        y = (y * self.scale[...]).astype(self.dtype)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class Int8Embed(nnx.Module):
    """The tied embedding in int8: `embedding` `(vocab, dim)` with a float32 `scale` per vocabulary row. `__call__`
    looks rows up, `attend` is the output projection `(..., dim)` -> `(..., vocab)`, both in `dtype`."""

    def __init__(self, embedding, scale, *, axes: tuple, dtype):
        self.embedding = _param(embedding, axes)
        self.scale = _param(scale, axes[:1])
        self.dtype = dtype

    @classmethod
    def from_embed(cls, embed: nnx.Embed) -> Int8Embed:
        table, scale = quantize_columns(embed.embedding[...].T)  # a row of the table is an output channel
        return cls(table.T, scale, axes=_axes(embed.embedding), dtype=embed.dtype or jnp.float32)

    def __call__(self, ids):
        rows = self.embedding[...][ids].astype(self.dtype)
        return rows * self.scale[...][ids][..., None].astype(self.dtype)

    def attend(self, x):
        logits = jnp.dot(x.astype(self.dtype), self.embedding[...].T.astype(self.dtype),
                         preferred_element_type=jnp.float32)
        return (logits * self.scale[...]).astype(self.dtype)


def _submodule(module, dotted: str):
    for name in dotted.split("."):
        module = getattr(module, name)
    return module


def quantize_int8(model):
    """`model` (an AF2Model in the serving layout) with `QUANTIZED` and the embedding in int8, in place; returns it.
    Works on abstract models too (`nnx.eval_shape`), which is how `plan` sizes an int8 model."""
    if not isinstance(model.layers, LayerList):
        raise ValueError("int8 weights are for serving, which keeps one buffer per layer: load with "
                         "scan_layers=False (infer --scan-layers cannot be combined with --quantize)")
    for layer in model.layers:
        for owner, names in QUANTIZED.items():
            parent = _submodule(layer, owner)
            for name in names:
                setattr(parent, name, Int8Linear.from_linear(getattr(parent, name)))
    model.embed_tokens = Int8Embed.from_embed(model.embed_tokens)
    return model
