"""Released PyTorch weights -> af2-jax checkpoint, and back.

Import streams tensor by tensor: each source tensor is read by offset, transformed, cast and copied into its slot of
the output tree, so memory peaks at about the output plus one tensor. Alias twins are compared in chunks. Export
rebuilds the complete original state_dict: parameters (float32), recomputed constant buffers, the dead tensors kept
aside at import, and every alias name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from af2_jax.checkpoint import keymap
from af2_jax.checkpoint.errors import CheckpointError, reason
from af2_jax.checkpoint.folder import AtomicFolder, read_config, write_config
from af2_jax.checkpoint.native import storage_dtype
from af2_jax.checkpoint.orbax_tree import flatten, nest, restore_tree, save_tree, stored_shapes
from af2_jax.checkpoint.original import checked_report, map_checkpoint, slot_shapes, slot_values
from af2_jax.checkpoint.safetensors_io import SafetensorsCheckpoint, write_safetensors
from af2_jax.config import PRESETS, AF2Config, resolve_model_config
from af2_jax.nn.af2 import AF2Model
from af2_jax.nn.layer_stack import Slot, slots
from af2_jax.sharding import Placement, format_mesh, make_mesh, variable_sharding
from af2_jax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DEFAULT_CHUNK_BYTES = 5 << 30
RELEASED_VOCAB = 151669


def open_source(src) -> SafetensorsCheckpoint:
    """A local release folder / safetensors file(s), or a hub id downloaded through huggingface_hub."""
    path = Path(src)
    if not path.exists() and _HUB_ID.fullmatch(str(src)):
        return SafetensorsCheckpoint(download_release(str(src)))
    return SafetensorsCheckpoint(path)


def download_release(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id=repo_id, allow_patterns=["safe_ckpt/*"])
    except Exception as err:  # offline, unknown repo, auth: all end the same way for the user
        raise CheckpointError(f"could not download {repo_id} from the Hugging Face hub ({reason(err)}); download "
                              "its safe_ckpt/ folder elsewhere and pass the local folder as SRC") from None
    return Path(folder)


def infer_config(ckpt: SafetensorsCheckpoint) -> AF2Config:
    """The preset whose LM matches the checkpoint's embedding width and layer count."""
    names = ckpt.keys()
    embed = next((n for n in ("lang_encoder.model.embed_tokens.weight", "lang_encoder.lm_head.weight")
                  if n in ckpt), None)
    if embed is None:
        raise CheckpointError(f"{ckpt.source}: no lang_encoder.model.embed_tokens.weight; not an AF2 checkpoint?")
    hidden = ckpt.info(embed).shape[1]
    layers = {int(m[1]) for n in names if (m := re.match(r"lang_encoder\.model\.layers\.(\d+)\.", n))}
    for name, cfg in PRESETS.items():
        if cfg.lm.hidden_size == hidden and cfg.lm.num_layers == len(layers):
            log.info("model: %s (from the checkpoint's shapes)", name)
            return cfg
    raise CheckpointError(f"{ckpt.source}: an LM of width {hidden} with {len(layers)} layers matches no preset "
                          f"({', '.join(sorted(PRESETS))}); pass --model CONFIG.json")


def resolve_config(model, ckpt: SafetensorsCheckpoint) -> AF2Config:
    if model is None:
        return infer_config(ckpt)
    if isinstance(model, AF2Config):
        return model
    try:
        return resolve_model_config(model)
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def _model_slots(config: AF2Config) -> list[Slot]:
    """The checkpoint slots of an abstract model of `config` (no weights allocated)."""
    return slots(nnx.eval_shape(lambda: AF2Model(config, rngs=nnx.Rngs(0))))


@dataclasses.dataclass
class Inspection:
    """What the header check (`inspect`, the `--dry-run`) found: the configuration, how names map onto the model, the
    parameter count and the size of the converted parameters in bytes."""

    config: AF2Config
    report: object
    parameters: int
    out_bytes: int

    def summary(self, dtype) -> str:
        r = self.report
        return (f"{len(r.assignments)} tensors map onto {self.parameters:,} parameters ({self.out_bytes / 2**30:.2f} "
                f"GiB as {np.dtype(dtype).name}); {len(r.aliases)} alias names, {len(r.constants)} recomputed "
                f"buffers, {len(r.dead)} tensors unused at inference kept aside")


def inspect(src, model=None, dtype="bfloat16") -> Inspection:
    """Checks names, shapes, dtypes and byte ranges from the safetensors headers alone (the `--dry-run`); reads no
    tensor data."""
    ckpt = open_source(src)
    config = resolve_config(model, ckpt)
    model_slots = _model_slots(config)
    report = map_checkpoint(ckpt, slot_shapes(model_slots), config, what="the AF2 model")
    params = sum(int(np.prod(s.shape)) for s in model_slots)
    out_bytes = sum(int(np.prod(s.shape)) * storage_dtype(s.variable, dtype).itemsize for s in model_slots)
    return Inspection(config, report, params, out_bytes)


def convert(src, dst, model=None, dtype="bfloat16", *, overwrite=False, allow_alias_mismatch=False,
            mesh=None) -> Path:
    """Converts original weights at `src` into an af2-jax checkpoint at `dst`. Returns `dst`.

    With a `mesh` (a `jax.sharding.Mesh` or a spec such as "tensor=4"), every parameter is placed as the rules table
    places it on that mesh before writing, so the stored chunks are the shards: restoring onto the same mesh reads
    each device's shard as whole chunks."""
    ckpt = open_source(src)
    config = resolve_config(model, ckpt)
    model_slots = _model_slots(config)
    placement = None
    if mesh is not None:
        mesh = make_mesh(mesh) if isinstance(mesh, (str, dict)) else mesh
        placement = Placement(mesh, config)
        log.info("laying the checkpoint out for mesh %s: %s", format_mesh(dict(mesh.shape)), placement.report())
    # An unusable DST is refused before any tensor is read; a refused source leaves neither DST nor a partial folder.
    with AtomicFolder(dst, overwrite) as tmp:
        report = checked_report(ckpt, model_slots, config, what="the AF2 model",
                                allow_alias_mismatch=allow_alias_mismatch)
        params = {}
        for slot, value in slot_values(model_slots, report, ckpt.get, lambda var: storage_dtype(var, dtype)):
            # Hand Orbax device arrays: given numpy, it copies the whole tree to the device before writing.
            params[slot.path] = jax.device_put(
                value, None if placement is None else slot.sharding(variable_sharding(slot.variable, placement)))
            del value  # peak memory: the output plus one tensor
        unused = {name: ckpt.get(name) for name in report.dead}
        log.info("kept aside, unused at inference (%d tensors, restored by --export): %s", len(unused),
                 ", ".join(sorted(unused)))
        clap_prefix = next((p for p in keymap.CLAP_PREFIXES if any(n.startswith(p) for n in ckpt.keys())),
                           keymap.CANONICAL_CLAP_PREFIX)
        save_tree(tmp / "params", nest(params))
        del params
        save_tree(tmp / "unused", nest(unused))
        if config.lm.vocab_size == RELEASED_VOCAB:
            # The release ships no tokenizer; AF2's is Qwen2.5's plus four tokens, rebuilt offline here.
            load_tokenizer(tokens=config.tokens).save(tmp / "tokenizer")
        write_config(tmp, config, {"dtype": np.dtype(dtype).name, "clap_prefix": clap_prefix,
                                   "source": str(ckpt.source),
                                   "layout_mesh": None if mesh is None else dict(mesh.shape),
                                   # Original shapes: Orbax does not keep 0-d shapes (BatchNorm counters).
                                   "unused": {n: list(v.shape) for n, v in sorted(unused.items())}})
    log.info("wrote %s", dst)
    return Path(dst)


def export(src, dst, *, overwrite=False, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Path:
    """Writes an af2-jax checkpoint back in the released layout (`dst/safe_ckpt/metadata.json` + chunks) under the
    original names, float32, with aliases, constant buffers and the kept-aside tensors restored."""
    folder = Path(src)
    config, meta = read_config(folder)
    with AtomicFolder(dst, overwrite) as tmp:  # an unusable DST is refused before the arrays are read
        entries = _original_entries(folder, config, meta, _model_slots(config))
        safe = tmp / "safe_ckpt"
        safe.mkdir()
        chunks, current, size = {}, [], 0
        for entry in entries:
            nbytes = int(np.prod(entry[1], dtype=np.int64)) * np.dtype(entry[2]).itemsize
            if current and size + nbytes > chunk_bytes:
                chunks[f"model_chunk_{len(chunks)}"] = current
                current, size = [], 0
            current.append(entry)
            size += nbytes
        chunks[f"model_chunk_{len(chunks)}"] = current
        for chunk, chunk_entries in chunks.items():
            write_safetensors(safe / f"{chunk}.safetensors", chunk_entries)
        (safe / "metadata.json").write_text(json.dumps({c: [e[0] for e in es] for c, es in chunks.items()}))
    log.info("exported %s -> %s (%d tensors in %d chunk(s))", src, dst, len(entries), len(chunks))
    return Path(dst)


def _original_entries(folder: Path, config: AF2Config, meta: dict, model_slots: list[Slot]) -> list:
    """(original name, shape, dtype, produce) for every tensor of the original state_dict, from the af2-jax
    checkpoint in `folder`: its arrays are read here, each tensor is made when `produce()` is called."""
    stored = stored_shapes(folder / "params")
    params = flatten(restore_tree(folder / "params", nest(
        {s.path: jax.ShapeDtypeStruct(*stored[s.path]) for s in model_slots})))
    unused_names = list(meta.get("unused", {}))
    stored_unused = stored_shapes(folder / "unused") if unused_names else {}
    unused = flatten(restore_tree(folder / "unused", nest(
        {n: jax.ShapeDtypeStruct(*stored_unused[n]) for n in unused_names}))) if unused_names else {}
    unused_shapes = {n: (tuple(meta["unused"][n]), stored_unused[n][1]) for n in unused_names}
    prefix = meta.get("clap_prefix", keymap.CANONICAL_CLAP_PREFIX)

    def original(name: str) -> str:
        return prefix + name[len(keymap.CANONICAL_CLAP_PREFIX):] if name.startswith(keymap.CANONICAL_CLAP_PREFIX) \
            else name

    entries = []  # (name, shape, dtype, produce)
    for slot in model_slots:
        for i in (range(slot.shape[0]) if slot.layered else [None]):
            name, transform = keymap.to_source(slot.path if i is None else f"{slot.path}[{i}]")
            shape = transform.to_torch_shape(slot.shape if i is None else slot.shape[1:])

            def produce(path=slot.path, i=i, transform=transform):
                value = params[path] if i is None else params[path][i]
                return transform.to_torch(np.asarray(value, np.float32))

            for out_name in [original(name)] + keymap.aliases_of(name):
                entries.append((out_name, shape, np.float32, produce))
    for name, kind, indices in _constant_buffers(config):
        value = keymap.expected_constant(config, kind, *indices)
        entries.append((original(name), value.shape, value.dtype, lambda value=value: value))
    for name in unused_names:
        shape, dtype = unused_shapes[name]
        entries.append((original(name), shape, dtype, lambda name=name, shape=shape: unused[name].reshape(shape)))
    return entries


def _constant_buffers(config: AF2Config):
    """(original name, kind, indices) of every constant buffer the original's state_dict holds."""
    h = config.htsat
    out = []
    for stage, depth in enumerate(h.depths):
        for block in range(depth):
            base = f"{keymap.CANONICAL_CLAP_PREFIX}layers.{stage}.blocks.{block}."
            out.append((base + "attn.relative_position_index", "relative_position_index", (stage, block)))
            if keymap.expected_constant(config, "attn_mask", stage, block) is not None:
                out.append((base + "attn_mask", "attn_mask", (stage, block)))
    out.append(("audio_transformer_clap.position_enc.inv_freq", "inv_freq", ()))
    return out
