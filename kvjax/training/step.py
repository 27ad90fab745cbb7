"""The jitted functions of a training run: initialisation, training step, evaluation step."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import optax

from kvjax.config import ModelConfig, TrainConfig
from kvjax.models import build_model
from kvjax.training.base import load_base, merge_params
from kvjax.training.loss import loss_fn_for
from kvjax.training.optimizer import lr_schedule, make_optimizer
from kvjax.training.state import TrainState, init_state


def make_train_step(model, loss_fn, optimizer, schedule):
  """`(state, tokens_BxT1) -> (state, metrics)`; the state is donated (updated in place)."""

  def train_step(state: TrainState, tokens_BxT1):
    rng, step_rng = jax.random.split(state.rng)
    objective = lambda params, *a: loss_fn(model, merge_params(state.frozen, params), *a)
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, tokens_BxT1, step_rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(model, loss_fn):
  """`(params, tokens_BxT1) -> loss`, with a fixed key so evaluation is deterministic."""

  def eval_step(params, tokens_BxT1):
    return loss_fn(model, params, tokens_BxT1, jax.random.PRNGKey(0))[0]

  return jax.jit(eval_step)


class Steps(NamedTuple):
  init: Callable  # rng -> TrainState at step 0, placed on the first local device
  frozen: Any  # the frozen base parameters (`train.freeze_base`), else None
  train_step: Callable  # (state, tokens_BxT1) -> (state, metrics)
  eval_step: Callable  # (params, tokens_BxT1) -> loss


@functools.lru_cache(maxsize=8)
def compiled_steps(model_cfg: ModelConfig, train_cfg: TrainConfig, seq_len: int) -> Steps:
  """The run's jitted functions, built once per process per config: a run resumed in the same
  process (or a second run of one config) reuses the compiled programs."""
  model = build_model(model_cfg)
  loss_fn = loss_fn_for(model_cfg.kind)
  optimizer = make_optimizer(train_cfg)
  # Placed explicitly, so that a fresh state and a restored one (orbax places arrays) have the
  # same placement and share one compiled training step.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  base = load_base(model_cfg, train_cfg)
  init = jax.jit(functools.partial(init_state, model, optimizer, seq_len,
                                   freeze_base=train_cfg.freeze_base), out_shardings=device)
  return Steps(init=functools.partial(init, base=base),
               frozen=jax.device_put(base, device) if train_cfg.freeze_base else None,
               train_step=make_train_step(model, loss_fn, optimizer, lr_schedule(train_cfg)),
               eval_step=make_eval_step(model, loss_fn))
