"""The training state pytree and its initialisation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from kvjax.training.base import merge_params, split_params
from kvjax.training.lora import LORA, init_lora


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key, split once per step
  frozen: Any = None  # base parameters held fixed (`train.freeze_base`): never saved


def init_params(model: nn.Module, seq_len: int, rng: jax.Array):
  """Parameters as plain arrays (the logical-partitioning boxes removed)."""
  return nn.unbox(model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"])


def init_trained(model: nn.Module, seq_len: int, rng: jax.Array, base=None,
                 freeze_base: bool = False, lora_rank: int = 0, lora_targets: tuple = ()):
  """The parameters a run trains: the model's; with a `base`, those it has come from it, or
  with `freeze_base` only the others are trained, beside LoRA adapters of rank `lora_rank`."""
  params = init_params(model, seq_len, rng)
  if base is None:
    return params
  if not freeze_base:
    return merge_params(base, params)
  trained = split_params(params, base)[0]
  if lora_rank:
    trained[LORA] = init_lora(base, lora_targets, lora_rank, jax.random.fold_in(rng, 1))
  return trained


def init_state(model: nn.Module, optimizer: optax.GradientTransformation, seq_len: int,
               rng: jax.Array, base=None, **trained_kw) -> TrainState:
  """Step 0: `rng` picks the initial parameters (`init_trained`, which takes `trained_kw`) and
  the per-step random stream; the caller attaches a frozen base."""
  init_rng, train_rng = jax.random.split(rng)
  params = init_trained(model, seq_len, init_rng, base, **trained_kw)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=train_rng)
