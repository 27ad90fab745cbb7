"""Next-token samplers: greedy, temperature, top-k and top-p, composable in one config."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 0.0  # 0 means greedy
  top_k: int = 0  # 0 means no top-k cut
  top_p: float = 1.0  # 1 means no nucleus cut

  def __post_init__(self):
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Sets logits outside the top-k and outside the top-p nucleus to -inf."""
  if top_k:  # (a k beyond the vocabulary cuts nothing)
    kth_B1 = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_B1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token is kept if the mass before it < top_p.
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    n_keep_B1 = jnp.sum(mass_before_BxV < top_p, axis=-1, keepdims=True)
    cutoff_B1 = jnp.take_along_axis(sorted_BxV, n_keep_B1 - 1, axis=-1)
    logits_BxV = jnp.where(logits_BxV < cutoff_B1, -jnp.inf, logits_BxV)
  return logits_BxV


def sample(logits_BxV: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Returns int32 token ids [B]."""
  if cfg.temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = filter_logits(logits_BxV.astype(jnp.float32) / cfg.temperature, cfg.top_k, cfg.top_p)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)
