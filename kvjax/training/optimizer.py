"""AdamW with linear warmup, cosine decay and global-norm clipping, all from `TrainConfig`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kvjax.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine down to `lr * min_lr_ratio`.

  Written out rather than `optax.warmup_cosine_decay_schedule`, which rejects runs no longer
  than their warmup (short test and smoke runs).
  """
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warmup = step / max(cfg.warmup_steps, 1)
    progress = jnp.clip((step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1), 0, 1)
    cosine = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    return cfg.lr * jnp.where(step < cfg.warmup_steps, warmup, cosine)
  return schedule


def decay_mask(params):
  """Weight decay on matrices (projections and embeddings), not on vectors (norm scales)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                  mask=decay_mask))
