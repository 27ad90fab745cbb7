"""The gate: a small causal attention over a layer's input that flags, per token and K/V head,
whether later queries may see that token.

Flags are hard (`sigmoid score > threshold`) in the forward pass, so training sees exactly the
mask inference applies; the backward pass goes straight through to the sigmoid. The first
`num_sinks` positions are always kept, and a query always sees its own token.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kvjax.config import ModelConfig
from kvjax.layers.attention import causal_mask, dot_product_attention
from kvjax.layers.rope import apply_rope

# Initial score bias: sigmoid(3) = 0.95 keeps every token, so training starts from the base model.
INIT_BIAS = 3.0


def straight_through(hard: jax.Array, soft: jax.Array) -> jax.Array:
  """Exactly `hard` (as float) forward, the gradient of `soft` backward."""
  return hard.astype(soft.dtype) + (soft - jax.lax.stop_gradient(soft))


def visible_weights(keep_BxSxK: jax.Array, q_pos_BxT: jax.Array,
                    k_pos_BxS: jax.Array) -> jax.Array:
  """`[B, K, T, S]` weights for `dot_product_attention`: key s counts for query t iff it is kept
  or is the query's own token; keep's gradient passes through."""
  self_BxTxS = k_pos_BxS[:, None, :] == q_pos_BxT[:, :, None]
  return jnp.where(self_BxTxS[:, None], 1.0, jnp.moveaxis(keep_BxSxK, 2, 1)[:, :, None, :])


def eviction_loss(keep_fraction: jax.Array, target: float) -> jax.Array:
  """Squared distance of a layer's kept fraction from the target: unlike the paper's linear
  term, its gradient changes sign at the target, so the ratio settles there."""
  return jnp.square(keep_fraction - target)


class AttentionGate(nn.Module):
  """`(x_BxTxD, positions_BxT, cache) -> (keep_BxTxK, cache)`: straight-through keep flags.

  Without a cache (training) the gate attends causally over `x`; a cache that carries the
  gate's own K/V (`cache.gate`, when decoded tokens are gated too) is written and read instead.
  In a mutable `metrics` / `losses` apply, the layer reports its eviction ratio per K/V head and
  its weighted eviction loss.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, cache=None):
    cfg, g = self.cfg, self.cfg.attention_gate
    dense = lambda features, name, **kw: nn.DenseGeneral(
        features, kernel_init=nn.initializers.normal(cfg.init_std), dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype), name=name, **kw)
    heads = (g.num_heads, g.head_dim)
    q_BxTxNxE = apply_rope(dense(heads, "q", use_bias=False)(x_BxTxD), positions_BxT,
                           cfg.rope_theta)
    k_BxTxNxE = apply_rope(dense(heads, "k", use_bias=False)(x_BxTxD), positions_BxT,
                           cfg.rope_theta)
    v_BxTxNxE = dense(heads, "v", use_bias=False)(x_BxTxD)
    if cache is not None and cache.gate is not None:
      gate_cache = cache.gate.write(k_BxTxNxE, v_BxTxNxE, positions_BxT)
      h_BxTxNxE = gate_cache.attend(q_BxTxNxE, positions_BxT, impl="xla")
      cache = cache.replace(gate=gate_cache)
    else:
      h_BxTxNxE = dot_product_attention(q_BxTxNxE, k_BxTxNxE, v_BxTxNxE,
                                        causal_mask(positions_BxT, positions_BxT))
    score_BxTxK = dense(cfg.num_kv_heads, "score", axis=(-2, -1), use_bias=True,
                        bias_init=nn.initializers.constant(INIT_BIAS))(h_BxTxNxE)
    p_BxTxK = jax.nn.sigmoid(score_BxTxK.astype(jnp.float32))
    hard_BxTxK = (p_BxTxK > g.threshold) | (positions_BxT < g.num_sinks)[..., None]
    keep_BxTxK = straight_through(hard_BxTxK, p_BxTxK)
    self.sow("metrics", "evict_ratio", 1.0 - hard_BxTxK.mean(axis=(0, 1)))
    self.sow("losses", "evict", g.loss_weight * eviction_loss(keep_BxTxK.mean(), g.keep_ratio))
    return keep_BxTxK, cache
