"""One full AF2 forward (audio windows -> HTSAT -> audio transformer -> LM logits) at a release size with random
weights, timed once after compilation.

    python bench/model_forward.py [--model af2-3b] [--windows 12] [--tokens 64] [--dtype float32]

Weights are drawn in numpy one tensor at a time into an abstract model, so memory peaks at the weights themselves
(about 19 GB for af2-3b in float32).
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax.config import preset
from af2_jax.nn.af2 import AF2Model


def random_model(name: str, dtype) -> AF2Model:
    config = preset(name)
    abstract = nnx.eval_shape(lambda: AF2Model(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(state):
        scale = 0.02 if len(var.shape) > 1 else 0.1
        value = rng.standard_normal(var.shape, dtype=np.float32) * scale
        if isinstance(var, nnx.BatchStat) and var.shape:
            value = np.abs(value) + 1.0
        var.set_value(jnp.asarray(value, dtype))
    return nnx.merge(graphdef, state)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="af2-3b")
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    dtype = jnp.dtype(args.dtype)
    start = time.perf_counter()
    model = random_model(args.model, dtype)
    init_s = time.perf_counter() - start
    config = model.config
    rng = np.random.default_rng(1)
    audio = rng.uniform(-0.5, 0.5, (1, args.windows, config.audio.window_samples)).astype(np.float32)
    audio_mask = np.ones((1, args.windows), np.float32)
    ids = rng.integers(0, config.tokens.eos, (1, args.tokens))
    ids[0, 0] = config.tokens.media
    graphdef, state = nnx.split(model)

    def forward(state, audio, audio_mask, ids):
        return nnx.merge(graphdef, state).forward_audio_text(audio, audio_mask, ids)

    with jax.default_matmul_precision("highest" if dtype == jnp.float32 else "default"):
        start = time.perf_counter()
        compiled = jax.jit(forward).lower(state, audio, audio_mask, ids).compile()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        logits = jax.block_until_ready(compiled(state, audio, audio_mask, ids))
        run_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    device = jax.devices()[0]
    print(f"| {args.model} | {args.dtype} | {args.windows} | {args.tokens} | {device.platform} | {init_s:.1f} | "
          f"{compile_s:.1f} | {run_s:.1f} | {peak / 1e9:.1f} GB | logits {tuple(logits.shape)} "
          f"finite={bool(np.isfinite(np.asarray(logits)).all())} |")


if __name__ == "__main__":
    main()
