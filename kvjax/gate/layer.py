"""The gate: a small causal attention over a layer's input that flags, per token and K/V head,
whether later queries may see that token. It is the attention layer's K/V filter: its flags
travel with the chunk, and the layout applies them (`kvjax.layers.cache`).

Flags are hard (`sigmoid score > threshold`) in the forward pass, so training sees exactly the
mask inference applies; layouts apply them in logit space, and the backward pass goes straight
through to the log of the sigmoid, so a flag's gradient is that of its key's attention logit
(`kvjax.layers.dot_product`): bounded, where one through renormalised probabilities grows as
the mass left on kept keys shrinks. The first
`num_sinks` positions are always kept, and a query always sees its own token and the
`recent_tokens` before it.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.dense import DenseLayout
from kvjax.config import ModelConfig
from kvjax.layers.cache import Chunk
from kvjax.layers.dot_product import causal_mask, dot_product_attention
from kvjax.layers.rope import apply_rope

# The score is `token part + per-head bias`; the bias starts far above the token parts' initial
# spread (~1 over tokens), so training starts from the base model (everything kept). It is
# stored divided by BIAS_STEP, so that it moves ~BIAS_STEP * lr per Adam step: the budget must
# cross the threshold within a short run.
INIT_BIAS = 2.5
BIAS_STEP = 30.0


def _logit(p: float) -> float:
  return math.log(p / (1 - p))


def straight_through(hard: jax.Array, soft: jax.Array) -> jax.Array:
  """Exactly `hard` (as float) forward, the gradient of `soft` backward."""
  return hard.astype(soft.dtype) + (soft - jax.lax.stop_gradient(soft))


def eviction_loss(keep_BxTxK: jax.Array, target: float) -> jax.Array:
  """Mean over K/V heads of the squared distance of each head's kept fraction from the target:
  unlike the paper's linear term, its gradient changes sign at the target, so the ratio settles
  there; and per head, because a loss on the layer's mean is met just as well by one head
  keeping everything and another nothing (which training then finds)."""
  return jnp.square(keep_BxTxK.mean(axis=(0, 1)) - target).mean()


class AttentionGate(nn.Module):
  """`(x_BxTxE, positions_BxT, state) -> (keep_BxTxK, score_BxTxK, state)`: straight-through
  keep flags, and the score they threshold (+inf for the sinks) to rank tokens by.

  Without state (training) the gate attends causally within the chunk; `state`, the dense
  layout of the gate's own K/V that a cache keeps for it, is written and read instead, so a
  prompt prefilled in chunks is gated as if whole.
  In a mutable `metrics` / `losses` apply, the layer reports its eviction ratio per K/V head and
  its weighted eviction loss; both count the sinks and the sequence's last `recent_tokens` as
  kept, as the cache holds them once the sequence is in.

  Why training reaches the target per head rather than all-or-nothing: tokens' scores spread
  ~1 at init (the token's own input feeds the score), Adam's steps are small against that
  spread (unit-scale weights), and the eviction loss sets only the per-head bias.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxE: jax.Array, positions_BxT: jax.Array, state: DenseLayout | None = None
               ) -> tuple[jax.Array, jax.Array, DenseLayout | None]:
    cfg, g = self.cfg, self.cfg.attention_gate
    # Unit-scale weights, inputs scaled by fan_in^-1/2: Adam moves every weight by ~lr per
    # step whatever its scale, so with the usual 0.02-std init one step moved the gate's output
    # by several %, and the scores of all tokens together by more than their spread.
    dense = lambda x, features, name, axis=-1: nn.DenseGeneral(
        features, axis=axis, use_bias=False, kernel_init=nn.initializers.normal(1.0),
        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), name=name)(
            x * math.prod(x.shape[a] for a in np.atleast_1d(axis)) ** -0.5)
    heads = (g.num_heads, g.head_dim)
    q_BxTxAxD = apply_rope(dense(x_BxTxE, heads, "q"), positions_BxT, cfg.rope_theta)
    k_BxTxAxD = apply_rope(dense(x_BxTxE, heads, "k"), positions_BxT, cfg.rope_theta)
    v_BxTxAxD = dense(x_BxTxE, heads, "v")
    if state is None:
      h_BxTxAxD = dot_product_attention(q_BxTxAxD, k_BxTxAxD, v_BxTxAxD,
                                        causal_mask(positions_BxT, positions_BxT))
    else:
      chunk = Chunk(k_BxTxAxD, v_BxTxAxD, positions_BxT)
      h_BxTxAxD, state = state.write(chunk).attend(q_BxTxAxD, chunk)
    # The token's own input beside the gate's context summary: at init the gate attends
    # uniformly, so the summary alone barely differs between tokens.
    h_BxTxF = jnp.concatenate([h_BxTxAxD.reshape(*h_BxTxAxD.shape[:2], -1), x_BxTxE], axis=-1)
    token_BxTxK = dense(h_BxTxF, cfg.num_kv_heads, "score").astype(jnp.float32)
    bias_K = BIAS_STEP * self.param("bias", nn.initializers.constant(INIT_BIAS / BIAS_STEP),
                                    (cfg.num_kv_heads,), jnp.dtype(cfg.param_dtype))
    # How many tokens to keep is the bias's job, which tokens the token part's: the eviction
    # loss reaches only the bias, the LM loss only the token part. Through the token part the
    # eviction loss moves all tokens' scores together (Adam's fastest way to meet the budget)
    # and overshoots into all-or-nothing; the LM loss's noise would stall the bias.
    sg = jax.lax.stop_gradient
    sink_BxTx1 = (positions_BxT < g.num_sinks)[..., None]
    hard_BxTxK = (token_BxTxK + bias_K > _logit(g.threshold)) | sink_BxTx1
    keep_BxTxK = jnp.where(sink_BxTx1, 1.0, straight_through(
        hard_BxTxK, jax.nn.log_sigmoid(token_BxTxK + sg(bias_K))))
    last_Bx1 = positions_BxT.max(axis=1, keepdims=True)
    forced_BxTx1 = sink_BxTx1 | (positions_BxT > last_Bx1 - g.recent_tokens)[..., None]
    budget_BxTxK = jnp.where(forced_BxTx1, 1.0, straight_through(
        hard_BxTxK, jax.nn.sigmoid(sg(token_BxTxK) + bias_K)))
    self.sow("metrics", "evict_ratio", 1.0 - (hard_BxTxK | forced_BxTx1).mean(axis=(0, 1)))
    self.sow("losses", "evict", g.loss_weight * eviction_loss(budget_BxTxK, g.keep_ratio))
    score_BxTxK = jnp.where(sink_BxTx1, jnp.inf, sg(token_BxTxK + bias_K))
    return keep_BxTxK, score_BxTxK, state
