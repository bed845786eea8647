"""Per-device memory of serving or training AF2 on a mesh, computed without any weights (`python -m af2_jax.plan`).

Weights and caches are exact: each array's per-device shard, as the rules table of `af2_jax.sharding` places it, times
its dtype. Temporaries come from XLA's memory analysis of the compiled programs (generation: audio and text; training:
the train step), compiled for abstract inputs. On a CPU host, XLA computes bfloat16 temporaries in float32, so that
figure is an upper bound there.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from af2_jax.config import resolve_model_config
from af2_jax.engine import EnginePrograms, bucket_prompt, bucket_rows, bucket_windows
from af2_jax.nn.af2 import AF2Model
from af2_jax.nn.quant import check_quantize, quantize_int8
from af2_jax.sharding import (Placement, activation_sharding, batch_sharding, check_batch_splits, data_parallel_size,
                              format_mesh, make_mesh, parse_mesh_spec, variable_sharding)
from af2_jax.training.config import OptimSection
from af2_jax.training.step import TrainState, make_train_step, split_model


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """What to plan: a model (preset or config file) on a mesh spec, serving `batch` requests of `windows` windows,
    `prompt` prompt tokens and `new` new tokens; or, with `train` (a trainable-set preset or regex), a train step on a
    global batch of `batch` sequences. `hbm_gb` is the device memory to check against; `temporaries=False` skips
    compiling. `quantize="int8"` plans serving with int8 weights (`af2_jax.nn.quant`)."""

    model: str = "af2-3b"
    mesh: str = "tensor=1"
    dtype: str = "bfloat16"
    batch: int = 1
    windows: int = 12
    prompt: int = 512
    new: int = 256
    hbm_gb: float | None = None
    temporaries: bool = True
    scan_layers: bool = False
    train: str | None = None
    remat: bool = False
    quantize: str | None = None


def devices_needed(mesh_spec: str) -> int:
    return math.prod(parse_mesh_spec(mesh_spec).values())


def plan(request: PlanRequest) -> dict:
    """The plan as a dict of byte counts (`weights`, `caches` or `optimizer`, `temporaries`), `fits` (None without
    `hbm_gb`) and `table`, its Markdown table."""
    return plan_training(request) if request.train else plan_serving(request)


def _model_and_mesh(request: PlanRequest):
    """The model config, the mesh (on a CPU host, only as many simulated devices as it needs) and its placement."""
    config = resolve_model_config(request.model)
    devices = jax.devices()
    if devices[0].platform == "cpu" and len(devices) > devices_needed(request.mesh):
        devices = devices[:devices_needed(request.mesh)]
    mesh = make_mesh(request.mesh, devices)
    return config, mesh, Placement(mesh, config)


def _shard_bytes(shape, dtype, sharding) -> int:
    return int(np.prod(sharding.shard_shape(tuple(shape)), dtype=np.int64)) * np.dtype(dtype).itemsize


def plan_serving(request: PlanRequest) -> dict:
    config, mesh, placement = _model_and_mesh(request)
    dtype = jnp.dtype(request.dtype)
    check_quantize(request.quantize, request.scan_layers)

    def build():
        model = AF2Model(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0), scan_layers=request.scan_layers)
        return quantize_int8(model) if request.quantize else model

    graphdef, state = nnx.split(nnx.eval_shape(build))
    weights = 0
    shardings = {}
    stacked = collections.Counter()  # each layer parameter's bytes in the stacked form
    for path, var in nnx.to_flat_state(state):
        sharding = variable_sharding(var, placement)
        shardings[path] = sharding
        stored = jnp.float32 if isinstance(var, nnx.BatchStat) else var.dtype
        nbytes = _shard_bytes(var.shape, stored, sharding)
        weights += nbytes
        if path[0] == "layers" and not request.scan_layers:  # ("layers", i, ...) in the list form
            stacked[path[2:]] += nbytes

    rows = bucket_rows(max(request.batch, data_parallel_size(mesh)))
    check_batch_splits(mesh, rows)
    windows = bucket_windows(request.windows)
    prompt = bucket_prompt(request.prompt)
    lm, xa = config.lm, config.cross_attention
    # Each layer's caches are head-major, (batch, heads, length, head_dim), placed by the same rules as the weights
    # (the layers axis of the stacked form is never sharded, so both forms take the same bytes).
    cache_shape = (rows, lm.num_kv_heads, prompt + request.new, lm.head_dim)
    media_shape = (rows, xa.heads, windows * config.htsat.tokens_per_window, xa.dim_head)
    kv_cache = placement.sharding(("batch", "kv_heads", "length", "head_dim"), cache_shape)
    media_kv = placement.sharding(("batch", "xattn_heads", "audio_tokens", "head_dim"), media_shape)
    cache_bytes, media_bytes = _shard_bytes(cache_shape, dtype, kv_cache), _shard_bytes(media_shape, dtype, media_kv)
    caches = 2 * lm.num_layers * (cache_bytes + media_bytes)  # K and V

    temporaries = None
    if request.temporaries:
        temporaries = _temporaries(graphdef, state, shardings, mesh, config, rows, windows, prompt, request.new, dtype)
    fits, table = _table(request, placement, [
        f"{request.model}, {request.dtype}{', int8 weights' if request.quantize else ''}, mesh "
        f"{format_mesh(dict(mesh.shape))}; batch {request.batch} (bucket {rows}), {request.windows} windows (bucket "
        f"{windows}), prompt {request.prompt} (bucket {prompt}), {request.new} new tokens"],
        [("weights", weights), ("KV cache + cross-attention K/V", caches), ("weights + caches", weights + caches)],
        "compiled temporaries", temporaries)
    if not request.scan_layers and not request.quantize and math.prod(mesh.shape.values()) == 1:
        # serve --background-compile moves the weights (one stacked parameter at a time) and then the caches (one
        # stacked array at a time: every layer's K, or V) from the stacked form while serving.
        switch = max(max(stacked.values()), lm.num_layers * max(cache_bytes, media_bytes))
        table += (f"\nserve --background-compile needs {switch / 1e9:.3f} GB more while it moves the layers from the "
                  "stacked form (the largest stacked parameter or cache)")
    most = None
    if request.hbm_gb is not None:
        # Caches grow with the rows; the temporaries are taken as at this batch (they grow too, a little).
        most = max(int((request.hbm_gb * 1e9 - weights - (temporaries or 0)) // (caches / rows)), 0)
        most -= most % data_parallel_size(mesh)  # a batch must split over the data axes
        table += (f"\nat most {most} requests of these sizes fit in {request.hbm_gb:g} GB per device "
                  f"({caches / rows / 1e9:.4f} GB of caches each, temporaries as at this batch)")
    return {"weights": weights, "caches": caches, "temporaries": temporaries, "fits": fits, "table": table,
            "max_batch": most}


def _temporaries(graphdef, state, shardings, mesh, config, rows, windows, prompt, new, dtype) -> int:
    """Largest temporary allocation of the serving engine's programs for these shapes (`EnginePrograms.for_shapes`:
    the programs serving compiles), from XLA's memory analysis."""
    for path, var in nnx.to_flat_state(state):  # the abstract values, now with their shardings
        var.set_value(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=shardings[path]))
    programs = EnginePrograms(graphdef, config, mesh=mesh).for_shapes(
        state, dtype=dtype, slots=rows, windows=windows, prompt=prompt, max_len=prompt + new, steps=8)
    return max(p.memory_analysis().temp_size_in_bytes for p in programs.values())


def plan_training(request: PlanRequest) -> dict:
    """Per-device bytes of a train step: exact for weights, optimizer state and gradients; XLA's memory analysis
    of the compiled step for temporaries."""

    config, mesh, placement = _model_and_mesh(request)
    check_batch_splits(mesh, request.batch)
    compute = jnp.dtype(request.dtype)
    abstract = nnx.eval_shape(lambda: AF2Model(config, dtype=compute, param_dtype=jnp.float32,
                                               rngs=nnx.Rngs(0)))
    for _, var in nnx.to_flat_state(nnx.split(abstract)[1]):
        var.set_value(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=variable_sharding(var, placement)))
    graphdef, params, frozen = split_model(abstract, request.train)
    size = lambda tree: sum(_shard_bytes(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(tree))  # noqa
    trainable, fixed = size(params), size(frozen)
    optim = OptimSection(trainable=request.train, batch_size=request.batch)
    tx = optax.adamw(1e-4, weight_decay=0.1)
    state = TrainState(params, jax.eval_shape(tx.init, params), jax.ShapeDtypeStruct((), jnp.int32))
    moments = 2 * trainable  # AdamW's mu and nu mirror the trainable parameters and their placement
    temporaries = None
    if request.temporaries:
        batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, request.batch, len(shape)))
                 for name, shape, dtype in [
                     ("audio_x", (request.batch, request.windows, config.audio.window_samples), jnp.float32),
                     ("audio_x_mask", (request.batch, request.windows), jnp.float32),
                     ("input_ids", (request.batch, request.prompt), jnp.int32),
                     ("attention_mask", (request.batch, request.prompt), jnp.int32),
                     ("labels", (request.batch, request.prompt), jnp.int32)]}
        step = jax.jit(make_train_step(graphdef, tx, optim, remat=request.remat), donate_argnums=(0,))
        with activation_sharding(mesh, config):
            temporaries = step.lower(state, frozen, batch).compile().memory_analysis().temp_size_in_bytes
    fits, table = _table(request, placement, [
        f"{request.model} train step ({request.train}), {request.dtype} compute, float32 master weights, mesh "
        f"{format_mesh(dict(mesh.shape))}; batch {request.batch}, {request.windows} windows, {request.prompt} tokens"
        f"{', remat' if request.remat else ''}"], [
        ("trainable weights (float32)", trainable), ("frozen weights (float32)", fixed), ("AdamW moments", moments),
        ("weights + optimizer state", trainable + fixed + moments)],
        "compiled temporaries incl. gradients and activations", temporaries)
    return {"weights": trainable + fixed, "optimizer": moments, "temporaries": temporaries, "fits": fits,
            "table": table}


def _table(request: PlanRequest, placement, header: list[str], rows: list[tuple[str, int]],
           temporaries_label: str, temporaries: int | None) -> tuple[bool | None, str]:
    """Whether the plan fits `request.hbm_gb` (None without it) and its Markdown table: the header lines, the rules,
    one row per (label, bytes) of `rows` (the last is the total without temporaries), then the temporaries and the
    total when compiled."""
    total = rows[-1][1] + (temporaries or 0)
    fits = None if request.hbm_gb is None else total <= request.hbm_gb * 1e9
    lines = [*header, f"rules: {placement.report()}", "| per device | GB |", "|---|---|",
             *(f"| {label} | {nbytes / 1e9:.3f} |" for label, nbytes in rows)]
    if temporaries is not None:
        if jax.devices()[0].platform == "cpu":
            temporaries_label += " (CPU upper bound: XLA upcasts bfloat16 there)"
        lines += [f"| {temporaries_label} | {temporaries / 1e9:.3f} |", f"| total | {total / 1e9:.3f} |"]
    if fits is not None:
        lines.append(f"{'fits' if fits else 'does NOT fit'} in {request.hbm_gb:g} GB per device")
    return fits, "\n".join(lines)

