"""`python -m af2_jax.plan`: per-device memory of serving or training AF2 on a mesh, computed without any weights.

    python -m af2_jax.plan --model af2-3b --mesh tensor=4 --windows 30 --prompt 512 --new 256 --batch 8
    python -m af2_jax.plan --model af2-3b --mesh fsdp=4,tensor=2 --train sft --batch 8 --windows 12 --prompt 512

With `--train PRESET` (pretrain, sft, full or a regex) it plans a train step instead: float32 master weights,
AdamW moments and gradients of the trainable set, and the compiled step's temporaries for a global batch of
`--batch` sequences of `--prompt` tokens with `--windows` windows each.

Weights and caches are exact: each array's per-device shard, as the rules table of `af2_jax.sharding` places it, times
its dtype. Temporaries come from XLA's memory analysis of the two compiled generation programs (audio, text),
compiled for abstract inputs. On a CPU host, XLA computes bfloat16 temporaries in float32, so that figure is an
upper bound there; a host without enough devices for the mesh gets simulated CPU devices.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from af2_jax.cli import EXIT_CODES, EXIT_INPUT, prog, run_command, setup_logging, warn_if_cpu_only
from af2_jax.config import PRESETS


def _parser():
    p = argparse.ArgumentParser(prog=prog("plan"), description=__doc__, epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="af2-3b", help=f"preset ({', '.join(sorted(PRESETS))}) or config.json")
    p.add_argument("--mesh", default="tensor=1", help="e.g. 'tensor=4', 'data=2,tensor=4'")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--windows", type=int, default=12, help="10 s windows per clip (30 = 5 minutes)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--new", type=int, default=256, help="new tokens")
    p.add_argument("--hbm-gb", type=float, help="device memory to check against, in GB (1e9 bytes)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled programs' temporaries")
    p.add_argument("--scan-layers", action="store_true",
                   help="(serving) plan the stacked-layer layout, as `infer --scan-layers`")
    p.add_argument("--train", metavar="PRESET", help="plan a train step with this trainable set instead of serving")
    p.add_argument("--remat", action="store_true", help="(--train) recompute LM layers in the backward pass")
    return p


def _devices_needed(spec: str) -> int:
    from af2_jax.sharding import parse_mesh_spec

    return math.prod(parse_mesh_spec(spec).values())


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    return run_command(lambda: _run(args), (ValueError, OSError))


def _run(args) -> int:
    needed = _devices_needed(args.mesh)
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # Planning needs devices only to lay out the mesh: on a CPU host, simulate as many as the mesh has. This
        # must happen before JAX starts its backend; when `main` is called from a Python process where JAX already
        # runs, its devices are used as they are.
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", needed)
        except RuntimeError:
            pass
    warn_if_cpu_only()
    report = plan_training(args) if args.train else plan(args)
    print(report["table"])
    return 0 if report["fits"] in (None, True) else EXIT_INPUT


def _model_and_mesh(args):
    """The model config, the mesh (on a CPU host, only as many simulated devices as it needs) and its placement."""
    import jax

    from af2_jax.config import resolve_model_config
    from af2_jax.sharding import Placement, make_mesh

    config = resolve_model_config(args.model)
    devices = jax.devices()
    if devices[0].platform == "cpu" and len(devices) > _devices_needed(args.mesh):
        devices = devices[:_devices_needed(args.mesh)]
    mesh = make_mesh(args.mesh, devices)
    return config, mesh, Placement(mesh, config)


def _shard_bytes(shape, dtype, sharding) -> int:
    import numpy as np

    return int(np.prod(sharding.shard_shape(tuple(shape)), dtype=np.int64)) * np.dtype(dtype).itemsize


def plan(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from af2_jax.generate import bucket_prompt, bucket_rows, bucket_windows
    from af2_jax.nn.af2 import AF2Model
    from af2_jax.sharding import check_batch_splits, data_parallel_size, format_mesh, variable_sharding

    config, mesh, placement = _model_and_mesh(args)
    dtype = jnp.dtype(args.dtype)
    abstract = nnx.eval_shape(lambda: AF2Model(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0),
                                               scan_layers=args.scan_layers))
    graphdef, state = nnx.split(abstract)
    weights = 0
    shardings = {}
    for path, var in nnx.to_flat_state(state):
        sharding = variable_sharding(var, placement)
        shardings[path] = sharding
        stored = jnp.float32 if isinstance(var, nnx.BatchStat) else dtype
        weights += _shard_bytes(var.shape, stored, sharding)

    rows = bucket_rows(max(args.batch, data_parallel_size(mesh)))
    check_batch_splits(mesh, rows)
    windows = bucket_windows(args.windows)
    prompt = bucket_prompt(args.prompt)
    lm, xa = config.lm, config.cross_attention
    # Caches are head-major, (layers, batch, heads, length, head_dim), placed by the same rules as the weights.
    cache_shape = (lm.num_layers, rows, lm.num_kv_heads, prompt + args.new, lm.head_dim)
    media_shape = (lm.num_layers, rows, xa.heads, windows * config.htsat.tokens_per_window, xa.dim_head)
    kv_cache = placement.sharding(("layers", "batch", "kv_heads", "length", "head_dim"), cache_shape)
    media_kv = placement.sharding(("layers", "batch", "xattn_heads", "audio_tokens", "head_dim"), media_shape)
    caches = 2 * _shard_bytes(cache_shape, dtype, kv_cache) + 2 * _shard_bytes(media_shape, dtype, media_kv)

    temporaries = None
    if not args.no_compile:
        temporaries = _temporaries(graphdef, state, shardings, mesh, config, rows, windows, prompt, args.new, dtype)
    total = weights + caches + (temporaries or 0)
    fits = None if args.hbm_gb is None else total <= args.hbm_gb * 1e9
    cpu = jax.devices()[0].platform == "cpu"
    lines = [
        f"{args.model}, {args.dtype}, mesh {format_mesh(dict(mesh.shape))}; batch {args.batch} (bucket {rows}), "
        f"{args.windows} windows (bucket {windows}), prompt {args.prompt} (bucket {prompt}), {args.new} new tokens",
        f"rules: {placement.report()}",
        "| per device | GB |", "|---|---|",
        f"| weights | {weights / 1e9:.3f} |",
        f"| KV cache + cross-attention K/V | {caches / 1e9:.3f} |",
        f"| weights + caches | {(weights + caches) / 1e9:.3f} |",
    ]
    if temporaries is not None:
        label = "compiled temporaries (CPU upper bound: XLA upcasts bfloat16 there)" if cpu else \
            "compiled temporaries"
        lines.append(f"| {label} | {temporaries / 1e9:.3f} |")
        lines.append(f"| total | {total / 1e9:.3f} |")
    if fits is not None:
        lines.append(f"{'fits' if fits else 'does NOT fit'} in {args.hbm_gb:g} GB per device")
    return {"weights": weights, "caches": caches, "temporaries": temporaries, "fits": fits,
            "table": "\n".join(lines)}


def _temporaries(graphdef, state, shardings, mesh, config, rows, windows, prompt, new, dtype) -> int:
    """Largest temporary allocation of the audio and text programs, from XLA's memory analysis."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from af2_jax.generate import Sampling, _decode, _encode
    from af2_jax.sharding import activation_sharding, batch_sharding

    def spec(shape, dtype_, sharding=None):
        return jax.ShapeDtypeStruct(shape, dtype_, sharding=sharding)

    for path, var in nnx.to_flat_state(state):  # the abstract values, now with their shardings
        var.set_value(spec(var.shape, var.dtype, shardings[path]))
    abstract_state = state
    batch = lambda shape, d: spec(shape, d, batch_sharding(mesh, shape[0], len(shape)))  # noqa: E731
    samples = config.audio.window_samples
    audio = (abstract_state, batch((rows, windows, samples), jnp.float32), batch((rows, windows), jnp.float32))
    with activation_sharding(mesh, config):
        audio_program = jax.jit(lambda *a: _encode(*a, graphdef=graphdef)).lower(*audio).compile()
    media_kv, media_mask = jax.eval_shape(lambda *a: _encode(*a, graphdef=graphdef), *audio)
    text = (abstract_state, media_kv, batch(media_mask.shape, media_mask.dtype), batch((rows, prompt), jnp.int32),
            batch((rows, prompt), jnp.int32), jax.random.key(0))
    statics = dict(graphdef=graphdef, max_new_tokens=new, sampling=Sampling(), eos=config.tokens.eos,
                   pad=config.tokens.pad)
    with activation_sharding(mesh, config):
        text_program = jax.jit(lambda *a: _decode(*a, **statics)).lower(*text).compile()
    return max(p.memory_analysis().temp_size_in_bytes for p in (audio_program, text_program))


def plan_training(args) -> dict:
    """Per-device bytes of a train step: exact for weights, optimizer state and gradients; XLA's memory analysis
    of the compiled step for temporaries."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from af2_jax.nn.af2 import AF2Model
    from af2_jax.sharding import (activation_sharding, batch_sharding, check_batch_splits, format_mesh,
                                  variable_sharding)
    from af2_jax.training.config import OptimSection
    from af2_jax.training.step import TrainState, make_train_step, split_model

    config, mesh, placement = _model_and_mesh(args)
    check_batch_splits(mesh, args.batch)
    compute = jnp.dtype(args.dtype)
    abstract = nnx.eval_shape(lambda: AF2Model(config, dtype=compute, param_dtype=jnp.float32,
                                               rngs=nnx.Rngs(0)))
    for _, var in nnx.to_flat_state(nnx.split(abstract)[1]):
        var.set_value(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=variable_sharding(var, placement)))
    graphdef, params, frozen = split_model(abstract, args.train)
    size = lambda tree: sum(_shard_bytes(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(tree))  # noqa
    trainable, fixed = size(params), size(frozen)
    optim = OptimSection(trainable=args.train, batch_size=args.batch)
    tx = optax.adamw(1e-4, weight_decay=0.1)
    state = TrainState(params, jax.eval_shape(tx.init, params), jax.ShapeDtypeStruct((), jnp.int32))
    moments = 2 * trainable  # AdamW's mu and nu mirror the trainable parameters and their placement
    temporaries = None
    if not args.no_compile:
        batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, args.batch, len(shape)))
                 for name, shape, dtype in [
                     ("audio_x", (args.batch, args.windows, config.audio.window_samples), jnp.float32),
                     ("audio_x_mask", (args.batch, args.windows), jnp.float32),
                     ("input_ids", (args.batch, args.prompt), jnp.int32),
                     ("attention_mask", (args.batch, args.prompt), jnp.int32),
                     ("labels", (args.batch, args.prompt), jnp.int32)]}
        step = jax.jit(make_train_step(graphdef, tx, optim, remat=args.remat), donate_argnums=(0,))
        with activation_sharding(mesh, config):
            temporaries = step.lower(state, frozen, batch).compile().memory_analysis().temp_size_in_bytes
    total = trainable + fixed + moments + (temporaries or 0)
    fits = None if args.hbm_gb is None else total <= args.hbm_gb * 1e9
    cpu = jax.devices()[0].platform == "cpu"
    lines = [
        f"{args.model} train step ({args.train}), {args.dtype} compute, float32 master weights, mesh "
        f"{format_mesh(dict(mesh.shape))}; batch {args.batch}, {args.windows} windows, {args.prompt} tokens"
        f"{', remat' if args.remat else ''}",
        f"rules: {placement.report()}",
        "| per device | GB |", "|---|---|",
        f"| trainable weights (float32) | {trainable / 1e9:.3f} |",
        f"| frozen weights (float32) | {fixed / 1e9:.3f} |",
        f"| AdamW moments | {moments / 1e9:.3f} |",
        f"| weights + optimizer state | {(trainable + fixed + moments) / 1e9:.3f} |",
    ]
    if temporaries is not None:
        label = "compiled temporaries incl. gradients and activations" + (
            " (CPU upper bound: XLA upcasts bfloat16 there)" if cpu else "")
        lines += [f"| {label} | {temporaries / 1e9:.3f} |", f"| total | {total / 1e9:.3f} |"]
    if fits is not None:
        lines.append(f"{'fits' if fits else 'does NOT fit'} in {args.hbm_gb:g} GB per device")
    return {"weights": trainable + fixed, "optimizer": moments, "temporaries": temporaries, "fits": fits,
            "table": "\n".join(lines)}


if __name__ == "__main__":
    sys.exit(main())
