"""Mesh shapes and where their axes run: within one process (host) or across processes."""

import types

import numpy as np
import pytest

from mtp_jax.sharding import AXES, MeshConfig, axes_across_processes


def fake_grid(shape, per_process):
    """Devices numbered in jax.devices() order (process-major, as on GPU hosts) reshaped to `shape`."""
    n = int(np.prod(shape))
    devices = [types.SimpleNamespace(id=i, process_index=i // per_process) for i in range(n)]
    return np.asarray(devices, dtype=object).reshape(shape)


@pytest.mark.parametrize("shape,per_process,expected", [
    ((2, 8, 1), 8, ["data"]),             # 2 hosts x 8 GPUs: fsdp within a host, data across hosts
    ((1, 16, 1), 8, ["fsdp"]),            # fsdp over all 16: every all-gather crosses hosts
    ((2, 4, 2), 8, ["data"]),             # fsdp x tensor = 8 = one host
    ((4, 2, 2), 8, ["data"]),
    ((1, 8, 2), 8, ["fsdp"]),             # tensor pairs stay on a host, fsdp groups do not
    ((1, 2, 8), 4, ["fsdp", "tensor"]),   # tensor groups of 8 over hosts of 4
    ((8, 1, 1), 8, []),                   # one host
])
def test_axes_across_processes(shape, per_process, expected):
    assert axes_across_processes(fake_grid(shape, per_process)) == expected


def test_brute_force_agrees():
    """Against a direct check of every group along every axis."""
    for shape in [(2, 2, 2), (4, 2, 1), (1, 4, 2), (2, 1, 4)]:
        for per_process in (1, 2, 4, 8):
            grid = fake_grid(shape, per_process)
            want = []
            for axis, name in enumerate(AXES):
                groups = np.moveaxis(grid, axis, -1).reshape(-1, shape[axis])
                if any(len({d.process_index for d in g}) > 1 for g in groups):
                    want.append(name)
            assert axes_across_processes(grid) == want, (shape, per_process)


@pytest.mark.parametrize("cfg,n,shape", [
    (MeshConfig(), 8, (8, 1, 1)),
    (MeshConfig(data=2, fsdp=-1), 16, (2, 8, 1)),
    (MeshConfig(data=-1, fsdp=4, tensor=2), 16, (2, 4, 2)),
])
def test_mesh_shape(cfg, n, shape):
    assert cfg.shape(n) == shape


@pytest.mark.parametrize("cfg,n,match", [
    (MeshConfig(data=-1, fsdp=3), 8, "do not divide"),
    (MeshConfig(data=2, fsdp=2, tensor=1), 8, "but there are 8 devices"),
])
def test_mesh_shape_errors(cfg, n, match):
    with pytest.raises(ValueError, match=match):
        cfg.shape(n)
