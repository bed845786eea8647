"""Compile seconds of the serving engine's programs for one configuration, per program kind, from abstract weights
(no memory needed, so af2-3b runs on any machine): what a first request, or a warm-up, waits for.

    python bench/compile_time.py                              # af2-3b, the serving layout, 8 rows
    python bench/compile_time.py --model af2-3b --stacked --rows 1

One window, prompt bucket 16, 256 new tokens, bfloat16; the persistent compilation cache is off, so every program
compiles. Also prints each program's HLO size: compile time grows with it, and the serving layout repeats every
layer's computation where the stacked one runs a scan over one copy.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import af2_jax.engine as engine  # noqa: E402
from af2_jax.config import preset  # noqa: E402
from af2_jax.nn.af2 import AF2Model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="af2-3b")
    p.add_argument("--stacked", action="store_true", help="the stacked layers (default: one buffer per layer)")
    p.add_argument("--rows", type=int, default=8)
    args = p.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    config = preset(args.model)
    abstract = nnx.eval_shape(lambda: AF2Model(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                               rngs=nnx.Rngs(0), scan_layers=args.stacked))
    graphdef, state = nnx.split(abstract)
    for _, var in nnx.to_flat_state(state):
        var.set_value(jax.ShapeDtypeStruct(var.shape, var.dtype))
    programs = engine.EnginePrograms(graphdef, config)
    wanted = []  # the (kind, arguments, statics) serving compiles for these shapes
    programs.compiled = lambda kind, args_, **statics: wanted.append((kind, args_, statics))
    programs.for_shapes(state, dtype=jnp.bfloat16, slots=args.rows, windows=1, prompt=16, max_len=16 + 256, steps=8)
    print(f"{args.model}, {'stacked' if args.stacked else 'one buffer per layer'}, {args.rows} rows")
    print("| program | lower s | compile s | HLO lines |\n|---|---|---|---|")
    total = 0.0
    for kind, arguments, statics in wanted:
        fn = functools.partial(getattr(engine, engine.EnginePrograms.FUNCTIONS[kind]), graphdef=graphdef, **statics)
        start = time.perf_counter()
        lowered = jax.jit(fn).lower(*arguments)
        lowered_at = time.perf_counter()
        lowered.compile()
        done = time.perf_counter()
        total += done - start
        print(f"| {kind} | {lowered_at - start:.2f} | {done - lowered_at:.2f} | {lowered.as_text().count(chr(10))} |")
    print(f"| all | | {total:.1f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
