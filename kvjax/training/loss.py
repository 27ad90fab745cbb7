"""The training objective: the one place that turns a model and a batch into a loss.

A loss function is `(model, params, tokens_BxT1, rng) -> (loss, metrics)`: `tokens_BxT1` holds
`seq_len` inputs plus the shifted targets, `loss` is the scalar to minimise (mean nats/token for
a language model; evaluation reports it too), and `metrics` maps names to scalars or small
vectors that are logged beside it (a vector `v` is logged as `name/0`, `name/1`, ...). Model
kinds with another objective (an auxiliary loss, a loss per position in a block) register their
own function in `LOSS_FNS`; every other kind trains on `next_token_loss`.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import optax
from flax import traverse_util

from kvjax.models import block_transformer

LossFn = Callable[[nn.Module, dict, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def next_token_loss(model: nn.Module, params, tokens_BxT1: jax.Array, rng: jax.Array):
  """Mean cross-entropy of every next token, in nats/token (nats/byte for byte-level text).

  Layers may add terms by sowing into `losses` (an attention gate's eviction loss) and report
  values by sowing into `metrics` (logged under their module path); the cross-entropy alone is
  then logged as `lm_loss`.
  """
  del rng  # deterministic forward pass
  inputs_BxT, targets_BxT = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
  logits_BxTxV, sown = model.apply({"params": params}, inputs_BxT, mutable=["losses", "metrics"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT).mean()
  if not sown:
    return loss, {}
  reported = traverse_util.flatten_dict(sown.get("metrics", {}), sep="/")
  metrics = {name: values[0] for name, values in reported.items()}
  return loss + sum(jax.tree.leaves(sown.get("losses", {}))), {"lm_loss": loss, **metrics}


LOSS_FNS: dict[str, LossFn] = {"block_transformer": block_transformer.loss}


def loss_fn_for(kind: str) -> LossFn:
  """The objective of `model.kind`."""
  return LOSS_FNS.get(kind, next_token_loss)
