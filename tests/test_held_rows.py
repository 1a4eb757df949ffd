"""Each host verifies only the rows it holds, and the assembled result equals scoring every row in one place."""

from typing import NamedTuple

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mcpo_jax.mesh import make_mesh
from mcpo_jax.rewards import RewardPool, held_rows


class FakeDevice(NamedTuple):
  id: int
  process_index: int


def _as_processes(devices_indices: dict, hosts: int) -> dict:
  """The same index map with the 8 CPU devices dealt to `hosts` fake processes in id order, as on a pod."""
  per_host = len(devices_indices) // hosts
  return {FakeDevice(device.id, device.id // per_host): index for device, index in devices_indices.items()}


@pytest.mark.parametrize("hosts", [2, 4, 8])
@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 4, 2), (1, 1, 8)])
def test_every_row_has_one_owner_that_holds_it(hosts, shape):
  mesh = make_mesh(*shape)
  n = 16
  index_map = NamedSharding(mesh, PartitionSpec(("data", "fsdp"))).devices_indices_map((n, 5))
  fake = _as_processes(index_map, hosts)
  owners = held_rows.row_owners(fake, n)  # [N]
  held = {p: set() for p in range(hosts)}
  for device, index in fake.items():
    held[device.process_index].update(range(n)[index[0]])
  for row, owner in enumerate(owners):
    assert row in held[owner] and owner == min(p for p in held if row in held[p])
  replicas = mesh.shape["tensor"]  # rows are replicated over tensor; each distinct block is scored once
  counts = np.bincount(owners, minlength=hosts)
  assert counts.sum() == n and counts.max() <= n * replicas // hosts, counts


def _completions(n):
  rng = np.random.default_rng(0)
  examples = [{"prompt": f"{i}+1", "answer": str(i + 1), "domain": "even" if i % 2 else "odd", "verifier": "exact"}
              for i in range(n)]
  texts = [f"<answer>{e['answer'] if rng.random() < 0.5 else 'no'}</answer>" for e in examples]
  return texts, examples, [e["verifier"] for e in examples]


@pytest.mark.parametrize("spec", [("data", "fsdp"), None])  # rows split over the hosts; replicated: host 0 owns all
def test_two_hosts_assemble_the_single_host_result(monkeypatch, spec):
  """Two processes simulated in turn: each verifies the rows it owns (host 1 possibly none, yet it joins the
  sums); the sums across processes are replayed."""
  n, hosts = 16, 2
  texts, examples, verifiers = _completions(n)
  sharding = NamedSharding(make_mesh(2, 4, 1), PartitionSpec(spec))
  owners = held_rows.row_owners(_as_processes(sharding.devices_indices_map((n, 3)), hosts), n)
  rows = NamedTuple("GlobalRows", [("is_fully_addressable", bool)])(False)  # as on a pod; ownership is patched
  with RewardPool(0) as pool:
    want = pool.score(texts, examples, verifiers)
    seen, contributions = {}, {}
    real_score = pool.score

    def score(completions, exs, names):
      seen.setdefault(process, []).extend(e["prompt"] for e in exs)
      return real_score(completions, exs, names)

    monkeypatch.setattr(pool, "score", score)
    for process in (1, 0):  # process 1's contributions are recorded, then added to process 0's
      calls = iter(range(10))
      monkeypatch.setattr(held_rows, "owned_rows", lambda _, p=process: owners == p)

      def summed(x, p=process):
        call = next(calls)
        if p == 1:
          contributions[call] = x
          return x
        return x + contributions[call]

      monkeypatch.setattr(held_rows, "sum_over_processes", summed)
      got = held_rows.score_held_rows(pool, texts, examples, verifiers, rows)
  for process in (0, 1):
    assert sorted(seen.get(process, [])) == sorted(e["prompt"] for e, o in zip(examples, owners) if o == process)
  assert len(seen[0]) == (n // 2 if spec else n) and len(seen.get(1, [])) == (n // 2 if spec else 0)
  np.testing.assert_array_equal(got.rewards, want.rewards)
  np.testing.assert_array_equal(got.correct, want.correct)
  assert got.accuracy == want.accuracy and got.errors == want.errors == 0
  assert 0 < want.correct.sum() < n  # a mix of right and wrong rows: the assembly is not trivially all-equal


def test_one_host_scores_every_row():
  texts, examples, verifiers = _completions(8)
  rows = jax.device_put(np.zeros((8, 2)), NamedSharding(make_mesh(1, 8, 1), PartitionSpec("fsdp")))
  with RewardPool(0) as pool:
    want, got = pool.score(texts, examples, verifiers), held_rows.score_held_rows(pool, texts, examples, verifiers, rows)
  assert held_rows.owned_rows(rows).all()
  np.testing.assert_array_equal(got.rewards, want.rewards)
