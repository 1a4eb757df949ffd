"""The typed batch of one RL update: a step's scored rollouts, as the loss and the update read them."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainBatch:
  """N = B·G rows, the G rollouts of a prompt consecutive; P prompt tokens (left-padded), T response tokens.

  A pytree, so jax.tree.map splits, shards and gathers its rows; `replace` returns a copy with fields changed.
  """
  prompt_tokens: jax.Array  # [N, P] int32
  prompt_mask: jax.Array  # [N, P] 1 = real token
  tokens: jax.Array  # [N, T] int32 response tokens
  mask: jax.Array  # [N, T] 1 = response token (0 after the stop token)
  old_logp: jax.Array  # [N, T] the sampler's log-probs (of logits / temperature)
  ref_logp: jax.Array  # [N, T] the frozen reference's (old_logp when there is no KL term)
  rewards: jax.Array  # [N] float32
  correct: jax.Array  # [N] int32 1 = the verifier accepted the answer
  advantages: jax.Array  # [N] float32 group-relative (GRPO)
  group_ids: jax.Array  # [N] int32 which prompt (group) of the step the row answers
  domain_ids: jax.Array  # [N] int32 the prompt's domain
  # [N] int32 1 = the row is in the loss; None = every row. 0 for DAPO's masked truncated rows
  # (rewards.mask_truncated) and dynamic sampling's padding groups: such a row still counts in its group's
  # advantage statistics, but is in no loss term, normaliser or contrastive mask.
  in_loss: jax.Array | None = None

  @property
  def num_rows(self) -> int:
    return self.mask.shape[0]

  @property
  def loss_mask(self) -> jax.Array:
    """[..., N, T] the response tokens the loss reads: `mask` with the rows not in the loss zeroed."""
    return self.mask if self.in_loss is None else self.mask * self.in_loss[..., None].astype(self.mask.dtype)

  @property
  def loss_rows(self) -> int | jax.Array:
    """The number of rows in the loss (the row normaliser of the seq-mean aggregations)."""
    return self.num_rows if self.in_loss is None else jnp.sum(self.in_loss)
