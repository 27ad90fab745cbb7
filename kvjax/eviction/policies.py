"""Eviction policies: which prompt tokens each (layer, K/V head) keeps, as scores over keys
(definitions as in NVIDIA's kvpress):
- `streaming_llm`: 4 sink tokens and the most recent ones;
- `local_window`: the most recent tokens;
- `random`: a uniform random subset;
- `h2o`: attention received, summed over the queries that saw the token and divided by their
  number (so early tokens are not favoured for being seen more often);
- `tova`: attention from the last query;
- `snapkv`: attention from an observation window of the last queries, average-pooled over
  neighbouring keys; the window itself is always kept.
Attention is averaged over the query heads of a K/V head and over the layers that read one
producer's K/V (cross-layer sharing).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kvjax.layers.dot_product import NEG_INF, causal_mask

POLICIES = ("streaming_llm", "local_window", "random", "h2o", "tova", "snapkv")
ATTENTION_POLICIES = ("h2o", "tova", "snapkv")
STREAMING_SINKS = 4
SNAPKV_WINDOW = 32
SNAPKV_KERNEL = 5


def attention_probs(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, q_pos_BxT: jax.Array,
                    k_pos_BxS: jax.Array) -> jax.Array:
  """Causal attention probabilities averaged over each K/V head's query heads: `[B, K, T, S]`."""
  b, t, h, d = q_BxTxHxD.shape
  k = k_BxSxKxD.shape[2]
  q_BxTxKxGxD = q_BxTxHxD.reshape(b, t, k, h // k, d)
  logits_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                                preferred_element_type=jnp.float32) * (d ** -0.5)
  mask_Bx1x1xTxS = causal_mask(q_pos_BxT, k_pos_BxS)[:, None, None]
  probs_BxKxGxTxS = jax.nn.softmax(jnp.where(mask_Bx1x1xTxS, logits_BxKxGxTxS, NEG_INF), axis=-1)
  return probs_BxKxGxTxS.mean(axis=2)


def query_weights(policy: str, q_pos_BxT: jax.Array, lengths_B: jax.Array) -> jax.Array:
  """`[B, T]` weight of each prompt query's attention in the policy's key score."""
  q = q_pos_BxT
  n = lengths_B[:, None]
  if policy == "h2o":
    return (q < n).astype(jnp.float32)
  if policy == "tova":
    return (q == n - 1).astype(jnp.float32)
  if policy == "snapkv":
    window = jnp.minimum(SNAPKV_WINDOW, n)
    return ((q >= n - window) & (q < n)) / window
  raise ValueError(f"policy {policy!r} does not read attention; allowed: "
                   f"{', '.join(ATTENTION_POLICIES)}")


def observed_attention(policy: str, probs_BxKxTxS: jax.Array, q_pos_BxT: jax.Array,
                       lengths_B: jax.Array) -> jax.Array:
  """`[B, K, S]`: the attention each key got from the queries the policy reads."""
  return jnp.einsum("bkts,bt->bks", probs_BxKxTxS, query_weights(policy, q_pos_BxT, lengths_B))


def key_scores(policy: str, observed_BxKxS: jax.Array, lengths_B: jax.Array,
               rng: jax.Array) -> jax.Array:
  """`[B, K, S]` per-key score, higher is kept; -inf past each prompt's end.
  `observed_BxKxS` (from `observed_attention`) is read by the attention policies only."""
  s = observed_BxKxS.shape[-1]
  pos_S = jnp.arange(s, dtype=jnp.float32)
  n_Bx1x1 = lengths_B[:, None, None]
  if policy == "streaming_llm":
    score = jnp.where(pos_S < STREAMING_SINKS, jnp.inf, pos_S)
  elif policy == "local_window":
    score = pos_S
  elif policy == "random":
    score = jax.random.uniform(rng, observed_BxKxS.shape)
  elif policy == "h2o":
    score = observed_BxKxS / jnp.maximum(n_Bx1x1 - pos_S, 1)
  elif policy == "tova":
    score = observed_BxKxS
  elif policy == "snapkv":
    valid = (pos_S < n_Bx1x1).astype(jnp.float32)
    pad = SNAPKV_KERNEL // 2
    pool = lambda x: nn.avg_pool(x.reshape(-1, s, 1), (SNAPKV_KERNEL,),
                                 padding=((pad, pad),)).reshape(x.shape)
    valid = jnp.broadcast_to(valid, observed_BxKxS.shape)
    pooled = pool(observed_BxKxS * valid) / jnp.maximum(pool(valid), 1e-30)
    score = jnp.where(pos_S >= n_Bx1x1 - jnp.minimum(SNAPKV_WINDOW, n_Bx1x1), jnp.inf, pooled)
  else:
    raise ValueError(f"unknown eviction policy {policy!r}; allowed: {', '.join(POLICIES)}")
  score_BxKxS = jnp.broadcast_to(score, observed_BxKxS.shape)
  return jnp.where(pos_S < n_Bx1x1, score_BxKxS, -jnp.inf)
