"""The jitted functions of a training run: initialisation, training step, evaluation step."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import optax
from flax import traverse_util

from kvjax import sharding
from kvjax.config import MeshConfig, ModelConfig, TrainConfig
from kvjax.models import build_model
from kvjax.training.checkpoint import load_base
from kvjax.training.loss import loss_fn_for
from kvjax.training.optimizer import lr_schedule, make_optimizer
from kvjax.training.params import lora_scale, merge_params, model_params
from kvjax.training.state import TrainState, init_state


def make_train_step(model, loss_fn, optimizer, schedule, merge=merge_params):
  """`(state, tokens_BxT1) -> (state, metrics)`, to be jitted on a mesh (`sharding.shard_step`);
  `merge(frozen, trained)` gives the parameters the model applies (with LoRA: `model_params`)."""

  def train_step(state: TrainState, tokens_BxT1):
    rng, step_rng = jax.random.split(state.rng)
    objective = lambda params, *a: loss_fn(model, merge(state.frozen, params), *a)
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, tokens_BxT1, step_rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

  return train_step


def make_eval_step(model, loss_fn):
  """`(params, tokens_BxT1) -> loss`, with a fixed key so evaluation is deterministic."""

  def eval_step(params, tokens_BxT1):
    return loss_fn(model, params, tokens_BxT1, jax.random.PRNGKey(0))[0]

  return eval_step


def entries_like(tree, like):
  """The entries of the nested dict `tree` at the paths `like` has: e.g. the logical names or
  shardings of only what a frozen base leaves to train, or of only the base. A path `tree`
  lacks (a LoRA adapter's) keeps `like`'s own leaf, which has no name (replicated)."""
  flat = traverse_util.flatten_dict(tree)
  return traverse_util.unflatten_dict({path: flat.get(path, leaf) for path, leaf
                                       in traverse_util.flatten_dict(like).items()})


class Steps(NamedTuple):
  mesh: jax.sharding.Mesh  # every device of every process, shaped by `cfg.mesh`
  init: Callable  # rng -> TrainState at step 0, sharded on `mesh`
  abstract: Any  # the state's shapes and shardings on `mesh`: what a checkpoint restores onto
  frozen: Any  # the frozen base parameters (`train.freeze_base`), else None
  model_params: Callable  # state -> what the model applies (the base, trained entries, LoRA)
  train_step: Callable  # (state, tokens_BxT1) -> (state, metrics)
  eval_step: Callable  # (params, tokens_BxT1) -> loss


@functools.lru_cache(maxsize=8)
def compiled_steps(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh_cfg: MeshConfig,
                   seq_len: int) -> Steps:
  """The run's jitted functions, built once per process per config: a run resumed in the same
  process (or a second run of one config) reuses the compiled programs."""
  model = build_model(model_cfg)
  loss_fn = loss_fn_for(model_cfg.kind)
  optimizer = make_optimizer(train_cfg)
  mesh = sharding.make_mesh(mesh_cfg)
  base = load_base(model_cfg, train_cfg)
  init = functools.partial(init_state, model, optimizer, seq_len,
                           freeze_base=train_cfg.freeze_base, lora_rank=train_cfg.lora_rank,
                           lora_targets=train_cfg.lora_targets)
  merge = functools.partial(model_params, lora_scale=lora_scale(train_cfg))
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0), base)
  boxed = sharding.abstract_params(model, seq_len)
  shardings = sharding.state_shardings(abstract, entries_like(boxed, abstract.params), optimizer,
                                       mesh)
  model_shardings = sharding.logical_shardings(boxed, mesh)
  frozen_shardings = entries_like(model_shardings, base) if train_cfg.freeze_base else None
  batch_shape = (train_cfg.batch_size, seq_len + 1)
  # Placed explicitly, so that a fresh state and a restored one share one compiled training
  # step. (`jax.eval_shape` of the jitted init bound to `base` would lose the shardings, and
  # orbax would then restore onto the mesh the checkpoint was saved from.)
  return Steps(
      mesh=mesh,
      init=functools.partial(jax.jit(init, out_shardings=shardings), base=base),
      abstract=sharding.with_shardings(abstract, shardings),
      frozen=None if frozen_shardings is None else jax.device_put(base, frozen_shardings),
      model_params=lambda state: merge(state.frozen, state.params),
      train_step=sharding.shard_step(
          make_train_step(model, loss_fn, optimizer, lr_schedule(train_cfg), merge), mesh,
          shardings.replace(frozen=frozen_shardings), batch_shape),
      eval_step=jax.jit(make_eval_step(model, loss_fn),
                        in_shardings=(model_shardings, sharding.batch_sharding(mesh, batch_shape)),
                        out_shardings=sharding.replicated(mesh)))
