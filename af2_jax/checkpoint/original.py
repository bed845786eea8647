"""Matching original tensors to NNX parameters, and loading them.

`map_names` works on names and shapes alone (safetensors headers or a shape map) against an abstract model from
`nnx.eval_shape`, so a whole release can be checked without reading or allocating any weights. Targets are the
model's checkpoint slots (`af2_jax.nn.layer_stack.slots`); a layered slot is addressed per layer as `path[i]`, since
the original stores each layer's tensor under its own name.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax.checkpoint import keymap
from af2_jax.checkpoint.errors import CheckpointError
from af2_jax.checkpoint.safetensors_io import SafetensorsCheckpoint
from af2_jax.config import AF2Config
from af2_jax.nn.af2 import AF2Model
from af2_jax.nn.htsat import HTSAT
from af2_jax.nn.layer_stack import Slot, slots

log = logging.getLogger(__name__)

HTSAT_ROOT = "audio_encoder"
_MAX_LISTED = 8
_COMPARE_CHUNK_BYTES = 64 << 20


@dataclasses.dataclass
class MappingReport:
    """How the tensors of a checkpoint (within a scope of names) line up with a model's parameter slots."""

    assignments: dict[str, tuple[str, keymap.Transform]] = dataclasses.field(default_factory=dict)
    constants: dict[str, tuple[str, tuple[int, ...]]] = dataclasses.field(default_factory=dict)
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)  # alias name -> canonical name
    dead: list[str] = dataclasses.field(default_factory=list)
    out_of_scope: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    shape_errors: list[str] = dataclasses.field(default_factory=list)
    dtype_errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_errors or self.dtype_errors)

    def error_message(self, what: str) -> str:
        parts = []
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("wrong shape", self.shape_errors), ("wrong dtype", self.dtype_errors)):
            if items:
                shown = "; ".join(items[:_MAX_LISTED]) + (f"; ... {len(items) - _MAX_LISTED} more"
                                                           if len(items) > _MAX_LISTED else "")
                parts.append(f"{len(items)} {label}: {shown}")
        return (f"{what} does not fit the model configuration ({' | '.join(parts)}); "
                "check that --model / the config matches the checkpoint")


def slot_shapes(model_slots: list[Slot]) -> dict[str, tuple[int, ...]]:
    """Target name -> shape: one entry per slot, or per layer (`path[i]`) for a layered slot."""
    shapes = {}
    for slot in model_slots:
        if slot.layered:
            shapes.update({f"{slot.path}[{i}]": slot.shape[1:] for i in range(slot.shape[0])})
        else:
            shapes[slot.path] = slot.shape
    return shapes


def flat_shapes(module: nnx.Module, root: str = "") -> dict[str, tuple[int, ...]]:
    """Target name -> shape for a (possibly abstract) module, names prefixed by `root`."""
    return slot_shapes(slots(module, root + "." if root else ""))


def map_names(source_shapes: Mapping[str, tuple[int, ...]], target_shapes: Mapping[str, tuple[int, ...]],
              config: AF2Config, *, scope: tuple[str, ...] = ("",), rules=keymap.RULES) -> MappingReport:
    """Lines up source names (original state-dict names) with target slots, from shapes alone."""
    report = MappingReport()
    seen_canonical: dict[str, str] = {}
    for name, shape in source_shapes.items():
        shape = tuple(shape)
        if not name.startswith(scope):
            report.out_of_scope.append(name)
            continue
        twin = keymap.alias_twin(name)
        if twin is not None:
            report.aliases[name] = twin
            if twin in source_shapes and tuple(source_shapes[twin]) != shape:
                report.shape_errors.append(f"{name} is {shape} but its twin {twin} is {tuple(source_shapes[twin])}")
            if twin in source_shapes:
                continue  # the twin carries the mapping; values are compared when tensors are read
            name = twin  # only the alias is present: it stands for its twin
        canonical = keymap.canonical_name(name)
        if canonical in seen_canonical:
            report.unexpected.append(f"{name} (duplicates {seen_canonical[canonical]}: keep one clap prefix)")
            continue
        seen_canonical[canonical] = name
        if keymap.is_dead(name):
            report.dead.append(name)
            continue
        constant = keymap.constant_kind(name)
        if constant is not None:
            kind, indices = constant
            expected = keymap.expected_constant(config, kind, *indices)
            if expected is None:
                report.unexpected.append(f"{name} (this configuration has no such buffer)")
            elif shape != expected.shape:
                report.shape_errors.append(f"{name} is {shape}, expected {expected.shape}")
            else:
                report.constants[name] = constant
            continue
        mapped = keymap.to_target(name, rules)
        if mapped is None or mapped[0] not in target_shapes:
            report.unexpected.append(f"{name} {shape}")
            continue
        target, transform = mapped
        if transform.to_jax_shape(shape) != target_shapes[target]:
            report.shape_errors.append(
                f"{name} is {shape}, expected {transform.to_torch_shape(target_shapes[target])}")
            continue
        report.assignments[target] = (name, transform)
    for target, shape in target_shapes.items():
        if target in report.assignments:
            continue
        source = keymap.to_source(target, rules)
        if source is None:
            report.missing.append(f"{target} {shape} (no rule maps any tensor to it)")
            continue
        name, transform = source
        if not any(bad.startswith(name + " ") for bad in report.shape_errors):
            report.missing.append(f"{name} {transform.to_torch_shape(shape)}")
    return report


def map_checkpoint(ckpt: SafetensorsCheckpoint, targets: Mapping[str, tuple[int, ...]], config: AF2Config, *,
         scope=("",), what: str = "the checkpoint") -> MappingReport:
    report = map_names({n: ckpt.info(n).shape for n in ckpt.keys()}, targets, config, scope=scope)
    for alias, twin in report.aliases.items():
        if twin in ckpt and ckpt.info(alias).dtype != ckpt.info(twin).dtype:
            report.dtype_errors.append(f"{alias} is {ckpt.info(alias).dtype} but its twin {twin} is "
                                       f"{ckpt.info(twin).dtype}")
    # Every mapped slot is a floating-point parameter: integer or bool data there is a damaged or foreign file, which
    # a cast would silently turn into weights. (Integer buffers such as relative_position_index are constants.)
    for name, _ in report.assignments.values():
        if name in ckpt and ckpt.info(name).dtype.kind in "biu":
            report.dtype_errors.append(f"{name} is {ckpt.info(name).dtype}, expected a floating-point dtype")
    if not report.ok:
        raise CheckpointError(report.error_message(f"{ckpt.source}: {what}"))
    return report


def tensors_equal(ckpt: SafetensorsCheckpoint, a: str, b: str) -> bool:
    """Compares two same-shaped tensors chunk by chunk (bounded memory, bitwise)."""
    ia, ib = ckpt.info(a), ckpt.info(b)
    size = ia.end - ia.start
    if size != ib.end - ib.start:
        return False
    with open(ia.file, "rb") as fa, open(ib.file, "rb") as fb:
        for offset in range(0, size, _COMPARE_CHUNK_BYTES):
            n = min(_COMPARE_CHUNK_BYTES, size - offset)
            fa.seek(ia.start + offset)
            fb.seek(ib.start + offset)
            if fa.read(n) != fb.read(n):
                return False
    return True


def resolve_aliases(ckpt: SafetensorsCheckpoint, report: MappingReport, *, allow_mismatch: bool = False) -> None:
    """Checks every alias twin equal to its canonical tensor. A pair that differs is an error, unless
    `allow_mismatch`: then the alias wins, as in the original loader (docs/original.md#alias-keys)."""
    source_of = {name: target for target, (name, _) in report.assignments.items()}
    for alias, twin in report.aliases.items():
        if twin not in ckpt or tensors_equal(ckpt, alias, twin):
            continue
        if not allow_mismatch:
            raise CheckpointError(f"{ckpt.source}: alias {alias} differs from its twin {twin}; pass "
                                  "--allow-alias-mismatch to use the alias (the value the original loader keeps)")
        log.warning("alias %s differs from %s: using the alias, as the original loader does", alias, twin)
        target = source_of.get(twin)
        if target is not None:
            report.assignments[target] = (alias, report.assignments[target][1])


def check_constants(ckpt: SafetensorsCheckpoint, report: MappingReport, config: AF2Config) -> None:
    for name, (kind, indices) in report.constants.items():
        expected = keymap.expected_constant(config, kind, *indices)
        found = ckpt.get(name)
        same = (np.allclose(found, expected, rtol=1e-6, atol=0) if kind == "inv_freq"
                else np.array_equal(found.astype(expected.dtype), expected))
        if not same:
            raise CheckpointError(f"{ckpt.source}: buffer {name} differs from the value this configuration implies; "
                                  "the checkpoint was made with a different configuration")


def checked_report(ckpt: SafetensorsCheckpoint, model_slots: list[Slot], config: AF2Config, *, scope=("",),
                   what: str = "the checkpoint", allow_alias_mismatch: bool = False) -> MappingReport:
    """Everything checked before any weight is used: names and shapes (headers), constant buffers, alias twins."""
    report = map_checkpoint(ckpt, slot_shapes(model_slots), config, scope=scope, what=what)
    check_constants(ckpt, report, config)
    resolve_aliases(ckpt, report, allow_mismatch=allow_alias_mismatch)
    return report


def slot_values(model_slots: list[Slot], report: MappingReport, read: Callable[[str], np.ndarray],
                dtype_of: Callable[[nnx.Variable], np.dtype]) -> Iterator[tuple[Slot, np.ndarray]]:
    """(slot, stored value) with each value built from its mapped source tensor(s), a layered slot's layers stacked;
    one slot's value at a time."""
    for slot in model_slots:
        dtype = dtype_of(slot.variable)
        if slot.layered:
            value = np.empty(slot.shape, dtype=dtype)
            for i in range(slot.shape[0]):
                name, transform = report.assignments[f"{slot.path}[{i}]"]
                value[i] = transform.to_jax(read(name)).astype(dtype)
        else:
            name, transform = report.assignments[slot.path]
            value = transform.to_jax(read(name)).astype(dtype)
        yield slot, value
        del value  # so the caller's copy is the only one left


def load_into(abstract: nnx.Module, source, config: AF2Config, *, root: str = "", scope=("",),
              what: str = "the checkpoint", allow_alias_mismatch: bool = False) -> nnx.Module:
    """Materialises `abstract` (from `nnx.eval_shape`) with original weights from `source`."""
    ckpt = source if isinstance(source, SafetensorsCheckpoint) else SafetensorsCheckpoint(source)
    model_slots = slots(abstract, root + "." if root else "")
    report = checked_report(ckpt, model_slots, config, scope=scope, what=what,
                            allow_alias_mismatch=allow_alias_mismatch)
    for slot, value in slot_values(model_slots, report, ckpt.get, lambda var: np.dtype(var.dtype)):
        slot.assign(jnp.asarray(value))
    return abstract


def load_htsat(source, config: AF2Config, *, dtype=jnp.float32, param_dtype=jnp.float32):
    """Builds the HTSAT encoder from original weights (`clap.nvclap.*` or `clap.afclap.*`): a released checkpoint
    folder, `.safetensors` file(s) or an open `SafetensorsCheckpoint`. Constant buffers found in the file are
    checked equal to their recomputed values; tensors dead at inference are skipped."""
    abstract = nnx.eval_shape(lambda: HTSAT(config.htsat, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    return load_into(abstract, source, config, root=HTSAT_ROOT, scope=keymap.CLAP_PREFIXES, what="the audio encoder")


def load_original(source, config: AF2Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
                  allow_alias_mismatch: bool = False):
    """Builds the whole AF2 model straight from original weights (no conversion step), e.g. for tests."""
    abstract = nnx.eval_shape(lambda: AF2Model(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    return load_into(abstract, source, config, what="the AF2 model", allow_alias_mismatch=allow_alias_mismatch)
