"""The training state pytree and its initialisation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from kvjax.training.base import merge_params, split_params


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key, split once per step
  frozen: Any = None  # base parameters held fixed (`train.freeze_base`): never saved

  @property
  def model_params(self):
    """What the model applies: the trained parameters with the frozen base."""
    return merge_params(self.frozen, self.params)


def init_params(model: nn.Module, seq_len: int, rng: jax.Array):
  """Parameters as plain arrays (the logical-partitioning boxes removed)."""
  return nn.unbox(model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"])


def init_state(model: nn.Module, optimizer: optax.GradientTransformation, seq_len: int,
               rng: jax.Array, base=None, freeze_base: bool = False) -> TrainState:
  """Step 0: `rng` picks the initial parameters and the per-step random stream; a `base`
  replaces the parameters it has, or with `freeze_base` leaves only the others to train (the
  caller attaches the frozen base)."""
  init_rng, train_rng = jax.random.split(rng)
  params = init_params(model, seq_len, init_rng)
  if base is not None:
    params = split_params(params, base)[0] if freeze_base else merge_params(base, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=train_rng)
