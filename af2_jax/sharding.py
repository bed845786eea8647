"""Meshes and the ONE table that places logical axes on mesh axes.

Style: Auto axis types, parameters placed with `NamedSharding`s from the rules table, activations steered with
`with_sharding_constraint` on logical names. Changing the strategy means changing `RULES`, not model code.

Every parameter carries logical axis names from its creation (`af2_jax.nn.layers.named`). A logical axis maps to a
mesh axis only when the dimension splits into whole units there: attention projections are split by heads (so a
Qwen2.5 model with 2 KV heads keeps its K/V projections replicated on a tensor axis of 4), the MLP by its width, and
the HTSAT encoder never by heads (its first stage has 4): it is replicated and split over windows instead. What was
chosen is logged, per logical axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from typing import Mapping

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from af2_jax.config import AF2Config

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it may be split over (in order). Batch-like axes go over data and fsdp; weights' input
# (embed) dimension over fsdp; heads, MLP width and vocabulary over tensor.
RULES: dict[str, tuple[str, ...]] = {
    # activations
    "batch": ("data", "fsdp"),
    "windows": ("data", "fsdp"),
    "length": (),
    "audio_tokens": (),
    "head_dim": (),
    # LM and cross-attention parameters
    "layers": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "xattn_heads": ("tensor",),
    "xattn_kv": ("tensor",),
    "mlp": ("tensor",),
    # audio transformer
    "audio_embed": ("fsdp",),
    "audio_heads": ("tensor",),
    "audio_mlp": ("tensor",),
    # HTSAT: replicated (split over windows through its activations)
    "htsat_embed": (),
    "htsat_qkv": (),
    "htsat_mlp": (),
    "htsat_heads": (),
    "htsat_mel": (),
}


class MeshError(ValueError):
    """A mesh that cannot work for this model or batch. The message names the dimension and a valid mesh."""


def parse_mesh_spec(spec: str) -> dict[str, int]:
    sizes = {axis: 1 for axis in MESH_AXES}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise MeshError(f"mesh spec {spec!r}: expected comma-separated axis=size with axes {MESH_AXES}, "
                            "e.g. 'data=2,tensor=4'")
        sizes[name] = int(value)
    return sizes


def make_mesh(spec: str | Mapping[str, int], devices=None) -> Mesh:
    """A `Mesh` with axes ("data", "fsdp", "tensor") and Auto axis types from a spec like "data=2,tensor=4".
    `jax.make_mesh` lays the devices out: on TPUs it follows the chips' physical topology, so the innermost axis
    (tensor) gets the fastest links."""
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else {a: int(spec.get(a, 1)) for a in MESH_AXES}
    devices = jax.devices() if devices is None else devices
    total = math.prod(sizes.values())
    if total != len(devices):
        raise MeshError(f"mesh {format_mesh(sizes)} needs {total} devices but {len(devices)} are available; "
                        f"try {suggest_mesh(len(devices))}")
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def format_mesh(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{a}={sizes[a]}" for a in MESH_AXES)


def suggest_mesh(devices: int) -> str:
    return f"tensor={devices}" if devices <= 8 else f"fsdp={devices // 8},tensor=8"


@dataclasses.dataclass(frozen=True)
class Placement:
    """Resolves logical axes to mesh axes for one model on one mesh."""

    mesh: Mesh
    config: AF2Config

    def units(self, logical: str, size: int) -> int:
        """How many indivisible units a dimension of `size` along `logical` holds (heads for attention axes)."""
        lm, xa, at = self.config.lm, self.config.cross_attention, self.config.audio_transformer
        per_axis = {"q_heads": lm.num_heads, "kv_heads": lm.num_kv_heads, "xattn_heads": xa.heads,
                    "xattn_kv": 2 * xa.heads, "audio_heads": at.n_heads}
        return per_axis.get(logical, size)

    def mesh_axes(self, logical: str | None, size: int) -> tuple[str, ...]:
        if logical is None:
            return ()
        if logical not in RULES:
            raise KeyError(f"logical axis {logical!r} has no entry in af2_jax.sharding.RULES")
        units = self.units(logical, size)
        chosen = []
        for axis in RULES[logical]:
            n = self.mesh.shape[axis]
            if n > 1 and units % (n * math.prod(self.mesh.shape[a] for a in chosen)) == 0:
                chosen.append(axis)
        return tuple(chosen)

    def spec(self, logical_axes, shape) -> PartitionSpec:
        used: set[str] = set()
        parts = []
        for logical, size in zip(logical_axes, shape):
            axes = tuple(a for a in self.mesh_axes(logical, size) if a not in used)
            used.update(axes)
            parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*parts)

    def sharding(self, logical_axes, shape) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes, shape))

    def report(self) -> str:
        """One line per logical axis whose rule could not be applied in full on this mesh."""
        notes = []
        for logical, axes in RULES.items():
            for axis in axes:
                n = self.mesh.shape[axis]
                units = self.units(logical, 0)
                if n > 1 and units and units % n:
                    notes.append(f"{logical}: {units} units do not split over {axis}={n}, replicated")
        return "; ".join(notes) or "every rule applies in full"


def logical_axes(var) -> tuple | None:
    """The logical axis names a variable was created with (None: not annotated)."""
    names = var.get_metadata().get("out_sharding")
    return tuple(names) if names else None


def variable_sharding(var, placement: Placement) -> NamedSharding:
    """Where the rules table puts one variable (BatchNorm statistics, which flax creates without names, are
    replicated)."""
    from flax import nnx

    names = logical_axes(var)
    if names is None and isinstance(var, nnx.BatchStat):
        names = (None,) * len(var.shape)
    if names is None or len(names) != len(var.shape):
        raise MeshError(f"a {type(var).__name__} of shape {tuple(var.shape)} has no logical axis names; every "
                        "parameter needs them to be placed")
    return placement.sharding(names, var.shape)


def shard_model(model, mesh: Mesh):
    """Places every parameter of `model` on `mesh` by the rules table and returns the model (in place)."""
    from flax import nnx

    placement = Placement(mesh, model.config)
    _, state = nnx.split(model)
    for _, var in nnx.to_flat_state(state):
        var.set_value(jax.device_put(var[...], variable_sharding(var, placement)))
    log.info("mesh %s: %s", format_mesh(dict(mesh.shape)), placement.report())
    return model


_ACTIVATIONS: contextvars.ContextVar[Placement | None] = contextvars.ContextVar("af2_activation_placement",
                                                                             default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, config: AF2Config):
    """While tracing inside this context, `constrain` places activations on `mesh` by the rules table (no mesh:
    nothing is constrained)."""
    token = _ACTIVATIONS.set(None if mesh is None else Placement(mesh, config))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def constrain(x, logical_axes):
    """`with_sharding_constraint` by logical axis names, under `activation_sharding`; the identity outside it."""
    placement = _ACTIVATIONS.get()
    if placement is None:
        return x
    return jax.lax.with_sharding_constraint(x, placement.sharding(logical_axes, x.shape))


def data_parallel_size(mesh: Mesh | None) -> int:
    """Devices the batch is split over: data x fsdp (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_splits(mesh: Mesh, batch: int, name: str = "batch",
                       fix: str = "use a batch that is a multiple of {data} or a mesh with data*fsdp dividing {batch}"
                       ) -> None:
    """The one check that a batch divides over data x fsdp; `name` and `fix` (formatted with `data` and `batch`) say
    it in the caller's terms (a flag, a config key)."""
    data = data_parallel_size(mesh)
    if batch % data:
        raise MeshError(f"{name} {batch} does not split over data x fsdp = {data} devices; "
                        + fix.format(data=data, batch=batch))


def batch_sharding(mesh: Mesh, batch: int, ndim: int) -> NamedSharding:
    """Inputs split along the batch over the data axes (data x fsdp); one-line error if the batch does not divide."""
    check_batch_splits(mesh, batch)
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))
