"""The training state pytree and its initialisation."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from kvjax.training.params import init_trained


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key, split once per step
  frozen: Any = None  # base parameters held fixed (`train.freeze_base`): never saved


def init_state(model, optimizer: optax.GradientTransformation, seq_len: int, rng: jax.Array,
               base=None, **trained_kw) -> TrainState:
  """Step 0: `rng` picks the initial parameters (`init_trained`, which takes `trained_kw`) and
  the per-step random stream; the caller attaches a frozen base."""
  init_rng, train_rng = jax.random.split(rng)
  params = init_trained(model, seq_len, init_rng, base, **trained_kw)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=train_rng)
