"""Loading and saving af2-jax checkpoints (the folder of `af2_jax.checkpoint.folder`) as `AF2Model`s, on one
device, sharded over a mesh, or from several processes."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax.cache import use_compilation_cache
from af2_jax.checkpoint.errors import CheckpointError
from af2_jax.checkpoint.folder import AtomicFolder, check_tokenizer, read_config, write_config
from af2_jax.checkpoint.orbax_tree import flatten, nest, restore_tree, save_tree, stored_shapes
from af2_jax.nn.af2 import AF2Model
from af2_jax.nn.layer_stack import slots
from af2_jax.nn.quant import check_quantize, quantize_int8
from af2_jax.sharding import Placement, format_mesh, shard_model, variable_sharding

log = logging.getLogger(__name__)


def storage_dtype(var: nnx.Variable, dtype) -> np.dtype:
    """Parameters are stored in the requested dtype; BatchNorm running statistics always in float32 (bfloat16
    would move the mel normalisation by tenths of a dB)."""
    return np.dtype(np.float32) if isinstance(var, nnx.BatchStat) else np.dtype(dtype)


def save(model, dst, *, tokenizer=None, dtype=None, overwrite: bool = False, meta: dict | None = None) -> Path:
    """Writes a model (and optionally its tokenizer) as an af2-jax checkpoint, e.g. after training. With several
    JAX processes every process calls it: each writes its own shards, process 0 the rest."""
    dtype = np.dtype(dtype or model.dtype)
    if jax.process_count() > 1:
        return _save_from_processes(model, Path(dst), tokenizer, dtype, overwrite, meta)
    params = {slot.path: jax.device_put(np.asarray(slot.value()).astype(storage_dtype(slot.variable, dtype)))
              for slot in slots(model)}
    with AtomicFolder(dst, overwrite) as tmp:
        save_tree(tmp / "params", nest(params))
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        write_config(tmp, model.config, {"dtype": dtype.name, "unused": {}, **(meta or {})})
    return Path(dst)


def _save_from_processes(model, dst: Path, tokenizer, dtype, overwrite: bool, meta) -> Path:
    """`save` for a model sharded over several processes (shared filesystem): Orbax writes every process's shards
    into a temporary folder, then process 0 adds config and tokenizer and renames it into place."""
    from jax.experimental import multihost_utils

    if dst.exists() and not overwrite:  # every process sees the same filesystem, so all refuse together
        raise CheckpointError(f"{dst}: already exists; pass overwrite=True to replace it, or choose another path")
    tmp = dst.parent / f".{dst.name}.partial"
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    multihost_utils.sync_global_devices("af2_jax.save:start")
    save_tree(tmp / "params", nest({slot.path: slot.value().astype(storage_dtype(slot.variable, dtype))
                                    for slot in slots(model)}))
    if jax.process_index() == 0:
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        write_config(tmp, model.config, {"dtype": dtype.name, "unused": {}, **(meta or {})})
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    multihost_utils.sync_global_devices("af2_jax.save:end")
    return dst


def load(path, dtype="bfloat16", mesh=None, *, param_dtype=None, scan_layers: bool = True,
         quantize: str | None = None) -> AF2Model:
    """Loads a checkpoint written by `python -m af2_jax.convert` as an `AF2Model` whose weights and activations
    are in `dtype` ("float32" or "bfloat16"); `param_dtype` keeps the weights in another dtype (training: float32
    master weights, bfloat16 compute). With a `mesh` (`af2_jax.sharding.make_mesh`), every parameter is
    restored straight into its shards as the rules table places it: no host holds a full copy. `scan_layers=False`
    returns the layers as a list, the faster form for decoding (`af2_jax.nn.layer_stack`): the checkpoint's stacked
    parameters are cut into the layers as they are restored. `quantize="int8"` (with `scan_layers=False`) then
    stores the language model's weights in int8 with a scale per output channel (`af2_jax.nn.quant`), placed by the
    same rules. Also turns on the compilation cache (`af2_jax.cache.use_compilation_cache`)."""
    check_quantize(quantize, scan_layers)
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder; convert the release with "
                              "`python -m af2_jax.convert SRC DST` and pass DST")
    config, _ = read_config(folder)
    check_tokenizer(folder, config)
    use_compilation_cache()
    dtype = jnp.dtype(dtype)
    param_dtype = jnp.dtype(param_dtype or dtype)
    model = nnx.eval_shape(lambda: AF2Model(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0),
                                            scan_layers=scan_layers))
    model_slots = slots(model)
    stored = stored_shapes(folder / "params")
    expected = {slot.path: slot.shape for slot in model_slots}
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    wrong = sorted(p for p in set(expected) & set(stored) if stored[p][0] != expected[p])
    if missing or extra or wrong:
        raise CheckpointError(f"{folder}: parameters do not match config.json (missing {missing[:5]}, unexpected "
                              f"{extra[:5]}, wrong shape {wrong[:5]}); re-convert the checkpoint")
    if mesh is None:
        # Onto one device, whatever layout wrote the checkpoint (a multi-host training run, `convert --mesh`):
        # restored on the host, then each variable is copied to the device, so cutting layers compiles nothing.
        device = jax.local_devices()[0]
        target = {slot.path: np.empty(slot.shape, storage_dtype(slot.variable, param_dtype)) for slot in model_slots}
    else:
        device = None
        placement = Placement(mesh, config)
        log.info("mesh %s: %s", format_mesh(dict(mesh.shape)), placement.report())
        target = {slot.path: jax.ShapeDtypeStruct(slot.shape, storage_dtype(slot.variable, param_dtype),
                                                  sharding=slot.sharding(variable_sharding(slot.variable, placement)))
                  for slot in model_slots}
    restored = flatten(restore_tree(folder / "params", nest(target)))
    for slot in model_slots:
        slot.assign(restored.pop(slot.path), device)
    if quantize == "int8":
        del model_slots  # they hold the float weights: let each go as its int8 form replaces it
        quantize_int8(model)
        if mesh is not None:
            shard_model(model, mesh)  # the int8 values and scales where the rules put the weights they replace
    return model
