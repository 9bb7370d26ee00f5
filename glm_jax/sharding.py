"""The device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` (batch replicas), `fsdp` (batch, with weights sharded on `embed`), `tensor`
(heads and MLP columns), `sequence` (tokens and KV-cache positions; ring attention runs over it).
Weights, activations and the KV cache name their dims logically (see `RULES`); `Layout` turns
names into PartitionSpecs. A mesh axis that does not divide a dim is dropped for that dim
(replication), so a 2-KV-head model on tensor=8 replicates K/V only as much as it must.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "sequence", "tensor")  # device order: tensor innermost (fastest links)

RULES: dict[str, tuple[str, ...]] = {
    # weights
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "gate_up": (),
    "norm": (),
    # activations and the KV cache
    "batch": ("data", "fsdp"),
    "seq": ("sequence",),
    "act_embed": (),
    "cache_pages": ("data", "fsdp", "sequence"),   # the KV pool's pages: spread over every device but tensor's
}


def make_mesh(spec: str | Mesh | dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh from "tensor=2,sequence=4" or a dict (all four axes, others 1), or from a user's Mesh.

    The sizes must multiply to the number of devices; one size may be -1 (the rest). A Mesh may
    name any of the four axes, with any axis types (`jax.make_mesh` makes Explicit ones): it comes
    back with the same devices and axis names, all Auto, the form the shard_maps here expect."""
    if isinstance(spec, Mesh):
        unknown = set(spec.axis_names) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh axes {sorted(unknown)} unknown; use {', '.join(MESH_AXES)}")
        if devices is not None and set(spec.devices.flat) != set(devices):
            raise ValueError(f"the mesh's {spec.devices.size} devices are not the {len(devices)} asked for")
        return Mesh(spec.devices, spec.axis_names, axis_types=(AxisType.Auto,) * len(spec.axis_names))
    devices = list(devices if devices is not None else jax.devices())
    sizes = _parse(spec) if isinstance(spec, str) else dict(spec)
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axis {sorted(unknown)[0]!r}; use {', '.join(MESH_AXES)}")
    rest = [a for a, n in sizes.items() if n == -1]
    if len(rest) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = math.prod(n for n in sizes.values() if n != -1)
    if rest:
        if len(devices) % known:
            raise ValueError(f"mesh {spec!r}: {len(devices)} devices do not divide by {known}")
        sizes[rest[0]] = len(devices) // known
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh {spec!r} needs {math.prod(shape)} devices, {len(devices)} available")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def auto_axes(fn, *args):
    """fn(*args) where the arrays may carry Explicit sharding types (placed on a `jax.make_mesh`
    mesh, or made under `jax.set_mesh` of one): inside fn every mesh axis is Auto, so gathers and
    shard_maps over the `make_mesh` form of that mesh work; the result, shaped like args[0], gets
    args[0]'s sharding type back. Without Explicit axes this is fn(*args)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        mesh = next((m for m in (jax.typeof(a).sharding.mesh for a in args) if m.explicit_axes), mesh)
    if not mesh.explicit_axes:
        return fn(*args)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(fn, out_sharding=jax.typeof(args[0]).sharding.spec)(*args)


def _parse(spec: str) -> dict[str, int]:
    sizes = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"bad mesh entry {item!r}; expected AXIS=SIZE, e.g. 'tensor=2,sequence=4'") from None
        if sizes[name.strip()] == 0 or sizes[name.strip()] < -1:
            raise ValueError(f"bad mesh size in {item!r}")
    if not sizes:
        raise ValueError("empty mesh spec; e.g. 'sequence=8' or 'tensor=2,sequence=4'")
    return sizes


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh plus the rules: logical axis names -> shardings."""

    mesh: Mesh
    rules: tuple[tuple[str, tuple[str, ...]], ...] = tuple(RULES.items())

    def __post_init__(self):
        object.__setattr__(self, "mesh", make_mesh(self.mesh))  # a user's Explicit-axes mesh too

    @classmethod
    def create(cls, mesh: Mesh, *, weights_over_sequence: bool = False) -> "Layout":
        """The standard rules; with weights_over_sequence the weights' embed dim is also split
        over `sequence` (FSDP-style: each layer is gathered when used), for when the devices of a
        sequence-sharded cache cannot each hold 1/tensor of the weights."""
        rules = dict(RULES)
        if weights_over_sequence:
            rules["embed"] = ("fsdp", "sequence")
        return cls(mesh, tuple(rules.items()))

    def size(self, axis: str) -> int:
        return self.mesh.shape.get(axis, 1)

    def mesh_axes(self, logical: str | None, dim: int) -> tuple[str, ...]:
        """Mesh axes for one dim: the rule's axes, keeping a prefix whose product divides dim."""
        kept, product = [], 1
        for axis in dict(self.rules).get(logical, ()) if logical else ():
            n = self.size(axis)
            if n > 1 and dim % (product * n) == 0:
                kept.append(axis)
                product *= n
            elif n > 1:
                break
        return tuple(kept)

    def spec(self, axes: Sequence[str | None], shape: Sequence[int]) -> P:
        parts = []
        for name, dim in zip(axes, shape):
            kept = self.mesh_axes(name, dim)
            parts.append(None if not kept else kept[0] if len(kept) == 1 else kept)
        return P(*parts)

    def sharding(self, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))

    def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(axes, x.shape))

    def kv_repeat(self, num_kv_heads: int, num_heads: int) -> int:
        """How many copies of each KV head the tensor axis needs: 1 when it divides the KV heads,
        else tensor / kv_heads (each device then holds exactly the group its query heads read)."""
        t = self.size("tensor")
        if t == 1 or num_kv_heads % t == 0:
            return 1
        if t % num_kv_heads or num_heads % t:
            return 1  # no clean split: K/V stay replicated
        return t // num_kv_heads

