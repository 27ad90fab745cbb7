"""The training state pytree and its initialisation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key, split once per step


def init_params(model: nn.Module, seq_len: int, rng: jax.Array):
  """Parameters as plain arrays (the logical-partitioning boxes removed)."""
  return nn.unbox(model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"])


def init_state(model: nn.Module, optimizer: optax.GradientTransformation, seq_len: int,
               rng: jax.Array) -> TrainState:
  """Step 0: `rng` picks the initial parameters and the per-step random stream."""
  init_rng, train_rng = jax.random.split(rng)
  params = init_params(model, seq_len, init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=train_rng)
