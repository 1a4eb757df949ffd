"""DAPO's dynamic sampling (arXiv 2503.14476 §3.2): a step trains only on groups whose rewards differ.

A group whose G rewards all agree (all right, all wrong, or all the same shaped reward) has zero
advantages: it gives no policy gradient, yet it dilutes the token mean and still feeds the KL and
contrastive terms. With `data.dynamic_sampling` the loop drops such groups and rolls out further batches
of prompts, at most `data.max_sampling_rounds` more, until it has `prompts_per_step` informative groups.

The batch keeps its shape [B·G, P, T] whatever was found. When the cap is reached with k < B informative
groups, the other B − k slots hold dropped groups marked out of the loss (TrainBatch.in_loss = 0): a batch
of k groups would compile new programs for the update, the reference pass and the diagnostics at every new
k, and `train.minibatches` / `train.micro_batches` must divide the groups. The padding's compute is spent
only when the cap binds. Surplus informative groups (more than B in the last round) are not trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mcpo_jax.mesh import to_host
from mcpo_jax.sampling import Rollouts


def informative_groups(rewards: np.ndarray, group_size: int) -> np.ndarray:
  """[R·G] rewards -> [R] bool: the group's rewards are not all equal (its advantages are not all 0)."""
  groups = np.asarray(rewards).reshape(-1, group_size)  # [R, G]
  return groups.max(axis=1) > groups.min(axis=1)


def choose_groups(informative: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
  """informative [R] bool (R ≥ target) -> (chosen [target] group indices in sampling order, trained [target]
  bool): the first `target` informative groups, and, when there are fewer, the first dropped ones as padding."""
  if len(informative) < target:
    raise ValueError(f"{len(informative)} groups sampled; at least {target} are needed to fill a batch.")
  kept = np.flatnonzero(informative)[:target]
  padding = np.flatnonzero(~informative)[:target - len(kept)]
  chosen = np.sort(np.concatenate([kept, padding]))
  return chosen, informative[chosen]


def merge_rollouts(parts: Sequence[Rollouts], pad_id: int) -> Rollouts:
  """The rows of several rollout batches as one host Rollouts, in order: prompts left-padded to the longest
  prompt bucket (the largest of bucket sizes is a bucket size, so no new shape appears). The response
  length T is max_new_tokens in every part."""
  width = max(part.prompt_tokens.shape[1] for part in parts)
  left = lambda x, value: np.pad(to_host(x), ((0, 0), (width - x.shape[1], 0)), constant_values=value)
  concat = lambda name: np.concatenate([to_host(getattr(part, name)) for part in parts])
  return Rollouts(tokens=concat("tokens"), logprobs=concat("logprobs"), response_mask=concat("response_mask"),
                  lengths=concat("lengths"), truncated=concat("truncated"),
                  prompt_tokens=np.concatenate([left(part.prompt_tokens, pad_id) for part in parts]),  # [R·G, P]
                  prompt_mask=np.concatenate([left(part.prompt_mask, 0) for part in parts]))
