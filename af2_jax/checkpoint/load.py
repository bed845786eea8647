"""Matching original tensors to NNX parameters, and loading them.

`map_names` works on names and shapes alone (safetensors headers or a shape map) against an abstract model from
`nnx.eval_shape`, so a whole release can be checked without reading or allocating any weights.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax.checkpoint import keymap
from af2_jax.checkpoint.reader import CheckpointError, SafetensorsCheckpoint
from af2_jax.config import AF2Config
from af2_jax.nn.htsat import HTSAT

# Original names of the HTSAT audio encoder (either attribute name the original code used).
HTSAT_SCOPE = keymap.CLAP_PREFIXES
HTSAT_ROOT = "audio_encoder"
_MAX_LISTED = 8


@dataclasses.dataclass
class MappingReport:
    """How the tensors of a checkpoint (within `scope`) line up with a model's parameters."""

    assignments: dict[str, tuple[str, keymap.Transform]]  # target path -> (source name, transform)
    constants: dict[str, tuple[str, tuple[int, ...]]]  # source name -> (buffer kind, (stage, block))
    dead: list[str]  # source names kept aside, unused at inference
    out_of_scope: list[str]  # source names outside `scope` (handled by other parts of the model)
    missing: list[str]
    unexpected: list[str]
    shape_errors: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_errors)

    def error_message(self, what: str) -> str:
        parts = []
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("wrong shape", self.shape_errors)):
            if items:
                shown = "; ".join(items[:_MAX_LISTED]) + (f"; ... {len(items) - _MAX_LISTED} more"
                                                           if len(items) > _MAX_LISTED else "")
                parts.append(f"{len(items)} {label}: {shown}")
        return (f"{what} does not fit the model configuration ({' | '.join(parts)}); "
                "check that --model / the config matches the checkpoint")


def flat_shapes(module: nnx.Module, root: str = "") -> dict[str, tuple[int, ...]]:
    """Dotted NNX path -> shape of every variable of a (possibly abstract) module."""
    _, state = nnx.split(module)
    prefix = root + "." if root else ""
    return {prefix + ".".join(str(k) for k in path): tuple(var.shape) for path, var in nnx.to_flat_state(state)}


def map_names(source_shapes: Mapping[str, tuple[int, ...]], target_shapes: Mapping[str, tuple[int, ...]],
              config: AF2Config, *, scope: tuple[str, ...] = HTSAT_SCOPE,
              rules=keymap.HTSAT_RULES) -> MappingReport:
    report = MappingReport({}, {}, [], [], [], [], [])
    seen_canonical: dict[str, str] = {}
    for name, shape in source_shapes.items():
        if not name.startswith(scope):
            report.out_of_scope.append(name)
            continue
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
            kind, (stage, block) = constant
            expected = keymap.expected_constant(config, kind, stage, block)
            if expected is None:
                report.unexpected.append(f"{name} (this configuration has no such buffer)")
            elif tuple(shape) != expected.shape:
                report.shape_errors.append(f"{name} is {tuple(shape)}, expected {expected.shape}")
            else:
                report.constants[name] = constant
            continue
        mapped = keymap.to_target(name, rules)
        if mapped is None or mapped[0] not in target_shapes:
            report.unexpected.append(f"{name} {tuple(shape)}")
            continue
        target, transform = mapped
        converted = transform.to_jax_shape(tuple(shape))
        if converted != target_shapes[target]:
            report.shape_errors.append(
                f"{name} is {tuple(shape)}, expected {transform.to_jax_shape(target_shapes[target])}")
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
            report.missing.append(f"{name} {transform.to_jax_shape(shape)}")
    return report


def _abstract_htsat(config: AF2Config, dtype, param_dtype) -> HTSAT:
    return nnx.eval_shape(lambda: HTSAT(config.htsat, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def load_htsat(source, config: AF2Config, *, dtype=jnp.float32, param_dtype=jnp.float32) -> HTSAT:
    """Builds the HTSAT encoder from original weights (`clap.nvclap.*` or `clap.afclap.*`): a released checkpoint
    folder, `.safetensors` file(s) or an open `SafetensorsCheckpoint`. Constant buffers found in the file are
    checked equal to their recomputed values; tensors dead at inference are skipped."""
    ckpt = source if isinstance(source, SafetensorsCheckpoint) else SafetensorsCheckpoint(source)
    abstract = _abstract_htsat(config, dtype, param_dtype)
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    targets = {HTSAT_ROOT + "." + ".".join(str(k) for k in path): tuple(var.shape) for path, var in flat}
    report = map_names({n: ckpt.info(n).shape for n in ckpt.keys()}, targets, config)
    if not report.ok:
        raise CheckpointError(report.error_message(f"{ckpt.source}: the audio encoder"))
    for name, (kind, (stage, block)) in report.constants.items():
        expected = keymap.expected_constant(config, kind, stage, block)
        if not np.array_equal(ckpt.get(name).astype(expected.dtype), expected):
            raise CheckpointError(f"{ckpt.source}: buffer {name} differs from the value this configuration implies; "
                                  "the checkpoint was made with a different window size or grid")
    for path, var in flat:
        name, transform = report.assignments[HTSAT_ROOT + "." + ".".join(str(k) for k in path)]
        var.set_value(jnp.asarray(transform.to_jax(ckpt.get(name)), dtype=var.dtype))
    return nnx.merge(graphdef, state)
