"""Small constructors shared by every module: layers created with logical axis names on their parameters, so the
sharding rules (one table in `af2_jax.sharding`) can place them without touching model code."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

# PyTorch's default-ish initialisation scale used by the original modules (trunc_normal std 0.02).
_KERNEL_INIT = nnx.initializers.truncated_normal(stddev=0.02)


def named(initializer, axes: tuple):
    """An initializer whose variable carries logical axis names. Placement happens later, by the rules table in
    `af2_jax.sharding`, so variables are never sharded eagerly at creation."""
    return nnx.with_partitioning(initializer, axes, eager_sharding=False)


def linear(in_features: int, out_features: int, *, axes: tuple[str, str], use_bias: bool = True,
           dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
    """`nnx.Linear` whose kernel `(in, out)` carries `axes` and whose bias carries `axes[1]`."""
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=named(_KERNEL_INIT, axes),
        bias_init=named(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs)


def layer_norm(features: int, *, axis_name: str, eps: float, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm with the two-pass variance of PyTorch (flax's fast E[x^2]-E[x]^2 variance loses precision)."""
    return nnx.LayerNorm(
        features, epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
        scale_init=named(nnx.initializers.ones_init(), (axis_name,)),
        bias_init=named(nnx.initializers.zeros_init(), (axis_name,)),
        rngs=rngs)
