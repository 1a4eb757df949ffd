"""The decoder against transformers' PyTorch models: logits, hidden states, meshes, KV cache, export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import left_padded_batch, write_tiny_checkpoint

from mcpo_jax.mesh import make_mesh
from mcpo_jax.model import CheckpointError, ModelConfigError, from_pretrained, save_pretrained

FAMILIES = ("llama", "qwen2", "qwen3")
MESHES = {"1 device": (1, 1, 1), "2x4 fsdp x tensor": (1, 2, 4), "8x1 fsdp": (1, 8, 1)}
PARITY_TOL = 1e-4  # float32, max abs over real (non-padding) positions


def _mesh(shape):
  devices = jax.devices()[:int(np.prod(shape))]
  return make_mesh(*shape, devices=devices)


def _torch_reference(hf_model, ids, mask):
  """transformers' forward with positions counted from the left padding, as generate() does."""
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  with torch.no_grad():
    out = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions),
                   output_hidden_states=True)
  return out.logits.numpy(), out.hidden_states[-1].numpy()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mesh_name", MESHES)
def test_logits_and_hidden_match_transformers(tiny_checkpoints, family, mesh_name):
  directory, hf_model = tiny_checkpoints[family]
  ids, mask = left_padded_batch(np.random.default_rng(0), 8, 24, hf_model.config.vocab_size)
  want_logits, want_hidden = _torch_reference(hf_model, ids, mask)

  model = from_pretrained(directory, mesh=_mesh(MESHES[mesh_name]))
  out = jax.jit(lambda m, i, a: m(i, a))(model, ids, mask)
  real = mask.astype(bool)
  assert out.logits.shape == (8, 24, hf_model.config.vocab_size)
  np.testing.assert_allclose(np.asarray(out.logits)[real], want_logits[real], atol=PARITY_TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(out.hidden)[real], want_hidden[real], atol=PARITY_TOL, rtol=0)


def test_parameters_really_are_sharded(tiny_checkpoints):
  model = from_pretrained(tiny_checkpoints["llama"][0], mesh=_mesh((1, 2, 4)))
  q_proj = model.layers[0].attn.q_proj[...]  # [E, H, D] = ("embed", "heads", "head_dim") -> (fsdp, tensor, -)
  assert q_proj.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert q_proj.addressable_shards[0].data.shape == (128 // 2, 8 // 4, 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_decode_matches_full_forward(tiny_checkpoints, family):
  """The KV-cache interface: a left-padded prefill plus one-token decodes gives the full pass's logits."""
  directory, hf_model = tiny_checkpoints[family]
  model = from_pretrained(directory, mesh=_mesh((1, 2, 4)))
  ids, mask = left_padded_batch(np.random.default_rng(1), 4, 12, hf_model.config.vocab_size)
  full = model(ids, mask).logits  # [B, 12, V]

  prompt_len = 8
  cache = model.init_cache(4, 16)
  out = model(ids[:, :prompt_len], mask[:, :prompt_len], cache=cache)
  real = mask[:, :prompt_len].astype(bool)  # padding positions attend to nothing: their logits are arbitrary
  np.testing.assert_allclose(np.asarray(out.logits)[real], np.asarray(full)[:, :prompt_len][real], atol=1e-5)
  decode = jax.jit(lambda m, token, c: m(token, jnp.ones_like(token), cache=c))
  cache = out.cache
  for t in range(prompt_len, 12):
    out = decode(model, ids[:, t:t + 1], cache)
    cache = out.cache
    np.testing.assert_allclose(out.logits[:, 0], np.asarray(full)[:, t], atol=1e-5)
  assert int(cache.index) == 12


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_decoding_against_their_shared_prompt_match_the_full_forward(tiny_checkpoints, family):
  """The sampler's interface: 2 left-padded prompts prefilled once (return_kv), then 3 rows per prompt, each
  with its own tokens, decoded one token at a time against their prompt's one copy of keys (prefix with a
  cache) and their own slots: each row's logits equal the full pass over its prompt + tokens (1e-5)."""
  directory, hf_model = tiny_checkpoints[family]
  model = from_pretrained(directory, mesh=_mesh((1, 2, 4)))
  rng, rows, prompt_len, new = np.random.default_rng(4), 3, 7, 5
  prompt_ids, prompt_mask = left_padded_batch(rng, 2, prompt_len, hf_model.config.vocab_size)
  own = rng.integers(0, hf_model.config.vocab_size, (2 * rows, new))  # [N, T]: every row its own tokens
  ids = np.concatenate([np.repeat(prompt_ids, rows, axis=0), own], axis=1)
  mask = np.concatenate([np.repeat(prompt_mask, rows, axis=0), np.ones_like(own)], axis=1)
  full = np.asarray(model(ids, mask).logits)  # [N, P + T, V]

  prompt = model(prompt_ids, prompt_mask, return_logits=False, return_kv=True).cache
  decode = jax.jit(lambda m, token, c, p: m(token, jnp.ones_like(token), cache=c, prefix=p))
  cache = model.init_cache(2 * rows, 8)
  for t in range(new - 1):
    out = decode(model, own[:, t:t + 1], cache, prompt)
    cache = out.cache
    np.testing.assert_allclose(out.logits[:, 0], full[:, prompt_len + t], atol=1e-5)
  assert int(cache.index) == new - 1
  with pytest.raises(ValueError, match="cannot continue 2 prompts"):
    model(own[:3, :1], cache=model.init_cache(3, 8), prefix=prompt)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trips_through_transformers(tiny_checkpoints, tmp_path, family):
  directory, hf_model = tiny_checkpoints[family]
  model = from_pretrained(directory, mesh=_mesh((1, 2, 4)))
  save_pretrained(model, tmp_path / "export")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
  assert type(reloaded) is type(hf_model)
  ids, mask = left_padded_batch(np.random.default_rng(2), 4, 16, hf_model.config.vocab_size)
  want, _ = _torch_reference(hf_model, ids, mask)
  got, _ = _torch_reference(reloaded, ids, mask)
  np.testing.assert_array_equal(got, want)  # the same float32 weights, bit for bit


def test_save_pretrained_shards_large_exports(tiny_checkpoints, tmp_path):
  model = from_pretrained(tiny_checkpoints["qwen3"][0])
  from mcpo_jax.model.weights import save_hf_checkpoint
  save_hf_checkpoint(model, tmp_path, max_shard_bytes=200_000)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  reloaded = from_pretrained(tmp_path)
  ids = np.arange(20).reshape(2, 10)
  np.testing.assert_array_equal(reloaded(ids).logits, model(ids).logits)


def test_bfloat16_compute_stays_close(tiny_checkpoints):
  directory, hf_model = tiny_checkpoints["llama"]
  ids, mask = left_padded_batch(np.random.default_rng(3), 4, 16, hf_model.config.vocab_size)
  want, _ = _torch_reference(hf_model, ids, mask)
  got = from_pretrained(directory, dtype="bfloat16")(ids, mask).logits
  assert got.dtype == jnp.float32  # the LM head accumulates in float32
  real = mask.astype(bool)
  assert np.abs(np.asarray(got)[real] - want[real]).max() < 0.1  # bf16 has ~3 significant digits


def test_remat_gives_the_same_gradients(tiny_checkpoints):
  from flax import nnx
  directory, _ = tiny_checkpoints["qwen2"]
  ids = np.random.default_rng(4).integers(0, 256, (2, 10))

  def loss(model):
    return jnp.mean(jax.nn.log_softmax(model(ids).logits)[..., 0])

  plain = nnx.grad(loss)(from_pretrained(directory))
  remat = nnx.grad(loss)(from_pretrained(directory, remat="full"))
  for (path, a), (_, b) in zip(nnx.to_flat_state(plain), nnx.to_flat_state(remat)):
    np.testing.assert_allclose(a[...], b[...], atol=1e-6, err_msg=str(path))


# ---------------------------------------------------------------------------------------------
# Bad input: one clear message naming the thing and the fix.


def test_missing_directory_is_a_clear_error(tmp_path):
  with pytest.raises(CheckpointError, match=r"does not exist.*HF checkpoint directory"):
    from_pretrained(tmp_path / "nope")


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
  with pytest.raises(ModelConfigError, match=r"model_type='gpt2'.*llama, qwen2, qwen3"):
    from_pretrained(tmp_path)


def test_wrong_tensor_shape_names_tensor_and_both_shapes(tmp_path):
  write_tiny_checkpoint("llama", tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["intermediate_size"] = 512
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight.* has shape \((128, 256|256, 128)\) but config\.json implies \((128, 512|512, 128)\)"):
    from_pretrained(tmp_path)


def test_missing_tensor_is_named(tmp_path):
  import safetensors.numpy
  write_tiny_checkpoint("qwen3", tmp_path)
  tensors = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
  del tensors["model.layers.1.self_attn.k_norm.weight"]
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.k_norm\.weight' is missing"):
    from_pretrained(tmp_path)


def test_missing_config_json_is_named(tmp_path):
  write_tiny_checkpoint("qwen2", tmp_path)
  (tmp_path / "config.json").unlink()
  with pytest.raises(CheckpointError, match=r"config\.json is missing"):
    from_pretrained(tmp_path)


def test_byte_range_reader_used_for_gs_paths_reads_the_same_tensors(tiny_checkpoints, monkeypatch):
  """gs:// checkpoints go through byte-range reads (safetensors' reader needs a local path), in parallel
  chunks (2 KiB here, so that every large tensor is several): the same sharded model, bit for bit."""
  from mcpo_jax.model import weights
  directory, _ = tiny_checkpoints["qwen2"]
  mesh = _mesh((1, 2, 4))
  local = from_pretrained(directory, mesh=mesh)
  monkeypatch.setattr(weights, "_is_remote", lambda path: True)
  monkeypatch.setattr(weights._RemoteSafetensorsFile, "CHUNK_BYTES", 2048)
  checkpoint = weights.SafetensorsCheckpoint(directory)
  assert all(isinstance(f, weights._RemoteSafetensorsFile) for f in checkpoint._files.values())
  remote = from_pretrained(directory, mesh=mesh)
  ids = np.arange(24).reshape(2, 12)
  np.testing.assert_array_equal(remote(ids).logits, local(ids).logits)


# The share of an HF tensor's rows each of 4 hosts (2 devices each) reads. HF keeps [out, in]; a host's
# shards span fewer rows only when `out` is sharded across hosts: under FSDP ("embed" on fsdp) that is
# o_proj and down_proj ([embed, ...]); the q/gate projections ([heads·D | mlp, embed]) are split by columns,
# which a row-major file cannot serve in one range, so each host reads them whole.
HOST_ROW_SHARES = {
    (1, 8, 1): {"q_proj": 1, "gate_proj": 1, "o_proj": 1 / 4, "down_proj": 1 / 4},
    (1, 2, 4): {"q_proj": 1 / 2, "gate_proj": 1 / 2, "o_proj": 1 / 2, "down_proj": 1 / 2},
    (1, 1, 8): {"q_proj": 1 / 4, "gate_proj": 1 / 4, "o_proj": 1, "down_proj": 1},
}


@pytest.mark.parametrize("mesh_shape", HOST_ROW_SHARES)
def test_each_host_reads_only_the_rows_its_shards_span(tiny_checkpoints, mesh_shape):
  """The 8 devices dealt to 4 simulated hosts of 2: each host reads one row range of each HF tensor and
  gets every shard it holds exactly (vs the whole tensor in our layout), reading the share above;
  `host_read_shares` predicts what each host reads in all."""
  from flax import nnx

  from mcpo_jax.mesh import named_sharding
  from mcpo_jax.model import weights
  directory, _ = tiny_checkpoints["qwen2"]
  mesh, config = _mesh(mesh_shape), weights.read_config(directory)
  checkpoint = weights.SafetensorsCheckpoint(directory)
  read = []
  real_read_rows = checkpoint.read_rows
  checkpoint.read_rows = lambda name, shape, start, stop: read.append(stop - start) or real_read_rows(
      name, shape, start, stop)
  specs, checked, elements, total = weights.hf_tensor_specs(config), set(), np.zeros(4), 0
  for path, variable in nnx.to_flat_state(nnx.state(weights.abstract_transformer(config, mesh))):
    hf_name, hf_shape, transposed = specs[path]
    whole = weights._hf_to_ours(real_read_rows(hf_name, hf_shape, 0, hf_shape[0]), variable.shape, transposed)
    index_of = named_sharding(mesh, variable.logical_axes, variable.shape).devices_indices_map(variable.shape)
    read.clear()
    for host in range(4):
      devices = jax.devices()[2 * host:2 * host + 2]
      shard = weights._host_shards(checkpoint, hf_name, hf_shape, transposed, tuple(variable.shape),
                                   [index_of[d] for d in devices])
      for device in devices:
        np.testing.assert_array_equal(shard(index_of[device]), whole[index_of[device]])
    assert len(read) == 4, hf_name
    elements += np.array(read) * np.prod(hf_shape[1:])
    total += np.prod(hf_shape)
    share = HOST_ROW_SHARES[mesh_shape].get(path[-1])
    if share is not None:
      assert read == [hf_shape[0] * share] * 4, (hf_name, read)
      checked.add(path[-1])
  assert checked == set(HOST_ROW_SHARES[mesh_shape])
  # The planning figure the AOT tool prints is what loading reads.
  shares = weights.host_read_shares(config, mesh, host_of=lambda device: device.id // 2)
  np.testing.assert_allclose(list(shares.values()), elements / total, rtol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_logprobs_match_transformers(tiny_checkpoints, family):
  """The training forward with each group's prompt encoded once (train.forward_rollouts, G = 3) gives
  transformers' log-probs of the concatenated prompt + response rows, sharded over a 2×4 mesh."""
  from flax import nnx
  from mcpo_jax.batch import TrainBatch
  from mcpo_jax.train import sequence_logprobs, shard_batch
  directory, hf_model = tiny_checkpoints[family]
  rng, prompts_count, group, p, t, vocab = np.random.default_rng(5), 8, 3, 10, 9, hf_model.config.vocab_size
  prompts, prompt_mask = left_padded_batch(rng, prompts_count, p, vocab)  # 0/3/7/0 pads
  prompts, prompt_mask = np.repeat(prompts, group, axis=0), np.repeat(prompt_mask, group, axis=0)
  tokens = rng.integers(0, vocab, (prompts_count * group, t))
  mask = (np.arange(t)[None] < rng.integers(1, t + 1, (prompts_count * group, 1))).astype(np.int64)  # ragged
  ids, full_mask = np.concatenate([prompts, tokens], 1), np.concatenate([prompt_mask, mask], 1)
  logits = _torch_reference(hf_model, ids, full_mask)[0].astype(np.float64)[:, p - 1:p + t - 1]
  want = (np.take_along_axis(logits, tokens[..., None], -1)[..., 0]
          - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) - logits.max(-1))

  mesh = _mesh((1, 2, 4))
  graphdef, params = nnx.split(from_pretrained(directory, mesh=mesh), nnx.Param)
  rows = np.zeros(tokens.shape[0], np.int32)  # the fields sequence_logprobs never reads
  batch = shard_batch(TrainBatch(prompt_tokens=prompts, prompt_mask=prompt_mask, tokens=tokens, mask=mask,
                                 old_logp=np.zeros(tokens.shape, np.float32), ref_logp=np.zeros(tokens.shape, np.float32),
                                 rewards=rows, correct=rows, advantages=rows, group_ids=rows, domain_ids=rows), mesh)
  got = jax.jit(lambda params, batch: sequence_logprobs(graphdef, params, batch, temperature=1.0, chunk=4,
                                                        prompt_group=group))(params, batch)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=PARITY_TOL, rtol=0)
