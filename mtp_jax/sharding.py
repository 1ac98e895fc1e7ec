"""Device mesh (data, fsdp, tensor) and the logical-axis rules that place params and activations.

Layers name their axes (`embed`, `vocab`, `q_heads`, ...); this module is the one place that maps
those names to mesh axes, so a layer never hard-codes a sharding.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes ([] = replicated)
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "embed_out": (),
    "sampler_in": (),
    "mlp": ("tensor",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "heads": ("tensor",),
    "head_dim": (),
    "norm": (),
    "lora_rank": (),
    "layers": (),  # the leading axis of the scanned decoder layers' params
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # devices per axis; -1 on one axis takes the devices left over
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # logical axis -> mesh axes; merged over DEFAULT_RULES (a key given here replaces the default)
    rules: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ValueError(f"mesh: sizes must be >= 1 with at most one -1, got data={self.data} "
                             f"fsdp={self.fsdp} tensor={self.tensor}")
        for name, axes in self.rules.items():
            bad = [a for a in axes if a not in AXES]
            if bad:
                raise ValueError(f"mesh.rules.{name}: unknown mesh axes {bad}; expected some of {list(AXES)}")

    def shape(self, n_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % known:
                raise ValueError(f"mesh: {n_devices} devices do not divide by fsdp*tensor = {known}")
            sizes[sizes.index(-1)] = n_devices // known
        if math.prod(sizes) != n_devices:
            raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {n_devices} devices")
        return tuple(sizes)

    def logical_rules(self) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
        merged = {**DEFAULT_RULES, **self.rules}
        return tuple((k, (tuple(v) if v else None)) for k, v in merged.items())


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = cfg.shape(len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # CPU / odd topologies: plain order
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def axes_across_processes(grid: np.ndarray) -> list[str]:
    """The mesh axes (of AXES, in order) along which one group of devices holds more than one process's
    devices: a collective over such an axis leaves the host (the inter-host network, not NVLink)."""
    procs = np.vectorize(lambda d: d.process_index)(grid)
    return [name for i, name in enumerate(AXES) if np.any(procs != np.take(procs, [0], axis=i))]


def logical_shardings(boxed_tree, mesh: Mesh, rules):
    """NamedSharding for every leaf of a tree boxed with logical axis names (unboxed leaves: replicated)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """[batch, length] arrays: rows over the batch axes, length whole."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))


def host_to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Process-local rows -> one global array per key (the rows of all processes, in process order)."""
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}
    return {k: multihost_utils.host_local_array_to_global_array(v, sharding.mesh, sharding.spec)
            for k, v in batch.items()}


def to_host(tree):
    """Replicated (or single-process) arrays -> numpy; works where other processes hold devices too."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)
