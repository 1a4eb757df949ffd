"""Mesh construction and the logical-axis rules."""

import jax
import pytest
from jax.sharding import AxisType, PartitionSpec

from mcpo_jax.mesh import MeshError, logical_to_spec, make_mesh, resolve_mesh_shape


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
