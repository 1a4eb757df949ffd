"""Mesh construction and the logical-axis rules."""

import importlib.util

import jax
import pytest
from jax.sharding import AxisType, PartitionSpec

from mcpo_jax.mesh import MeshError, axis_rules, logical_to_spec, make_mesh, resolve_mesh_shape


def test_minus_one_takes_the_remaining_devices():
  assert resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
  assert resolve_mesh_shape({"tensor": -1}, 8) == (1, 1, 8)
  mesh = make_mesh(1, -1, 4)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}
  assert all(t == AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("shape, message", [
    ({"data": 1, "fsdp": 3, "tensor": 1}, r"1×3×1 = 3 but there are 8 devices"),
    ({"data": 3, "fsdp": -1, "tensor": 1}, r"multiply to 3, which does not divide the 8 devices"),
    ({"data": -1, "fsdp": -1}, r"at most one axis may be -1"),
    ({"data": 0}, r"positive or -1"),
    ({"pipeline": 2}, r"unknown axis \['pipeline'\]"),
])
def test_a_mesh_that_does_not_fit_is_one_clear_error(shape, message):
  with pytest.raises(MeshError, match=message):
    resolve_mesh_shape(shape, 8)


def test_make_mesh_checks_the_device_count():
  with pytest.raises(MeshError, match=r"mesh\.data/fsdp/tensor"):
    make_mesh(1, 3, 1)


def test_logical_rules_map_and_drop_axes_that_do_not_divide():
  mesh = make_mesh(2, 2, 2)
  assert logical_to_spec(("batch", "length", None), (8, 5, 3), mesh) == PartitionSpec(("data", "fsdp"), None, None)
  assert logical_to_spec(("embed", "mlp"), (64, 256), mesh) == PartitionSpec("fsdp", "tensor")
  # A batch of 2 splits over data only; 3 KV heads cannot split over tensor=2 and stay replicated.
  assert logical_to_spec(("batch", "kv_heads"), (2, 3), mesh) == PartitionSpec("data", None)
  with pytest.raises(ValueError, match="unknown logical axis"):
    logical_to_spec(("bogus",), (4,), mesh)


def test_eight_fake_devices_are_present():
  assert jax.device_count() == 8


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed: pip install -r requirements-tpu.txt")
@pytest.mark.parametrize("topology, slices, shapes", [
    ("v5e:8x8", 1, [(1, -1, 1), (1, 16, 4), (2, 8, 4)]),  # v5e-64: the presets' fsdp and tensor-parallel meshes
    ("v5p:2x4x4", 1, [(1, -1, 1), (1, 16, 2), (1, 8, 4)]),  # v5p-64 (32 chips)
    ("v6e:16x16", 1, [(4, -1, 1), (1, 64, 4), (4, 16, 4), (1, 32, 8)]),  # v6e-256: the README's (4, 64, 1) first
    ("v5e:4x4", 2, [(2, -1, 1), (2, 4, 4)]),  # two slices: data spans them
])
def test_meshes_of_the_readme_and_presets_build_on_tpu_topologies(topology, slices, shapes):
  from mcpo_jax.aot import topology_devices
  devices = topology_devices(topology, slices)
  for shape in shapes:
    mesh = make_mesh(*shape, devices=devices)
    assert sorted(d.id for d in mesh.devices.ravel()) == sorted(d.id for d in devices)
    if slices > 1:  # each data index stays inside one slice; fsdp × tensor never crosses the network
      for block in mesh.devices:
        assert len({d.slice_index for d in block.ravel()}) == 1
  if slices > 1:
    with pytest.raises(MeshError, match="multiple of 2"):
      make_mesh(1, -1, 1, devices=devices)


def test_axis_rules_remap_logical_axes_inside_the_block_only():
  mesh = make_mesh(2, 2, 2)
  shape = (8, 4, 16)
  assert logical_to_spec(("mlp_rows", None, "mlp"), shape, mesh) == PartitionSpec(("data", "fsdp"), None, "tensor")
  with axis_rules({"mlp_rows": ("data",), "mlp": ("fsdp", "tensor")}):
    assert logical_to_spec(("mlp_rows", None, "mlp"), shape, mesh) == PartitionSpec("data", None, ("fsdp", "tensor"))
    assert logical_to_spec(("batch", None, "mlp"), shape, mesh) == PartitionSpec(("data", "fsdp"), None, "tensor")
  assert logical_to_spec(("mlp_rows", None, "mlp"), shape, mesh) == PartitionSpec(("data", "fsdp"), None, "tensor")
  with pytest.raises(ValueError, match="unknown logical axes \\['mpl'\\]"):
    with axis_rules({"mpl": ("fsdp",)}):
      pass
