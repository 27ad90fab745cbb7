"""Eviction while the prompt goes in (`model.eviction.protocol: in_context`): each (sequence, K/V
head) has a cache of the final size, round(keep_ratio x prompt length) tokens, that each prompt
token enters in turn. Its query attends over what the cache holds and itself; then, if the cache
is over its size, the policy evicts its lowest-scored token other than the newest:
- `streaming_llm`: the oldest but the sinks (a sink only when nothing else is left, the latest
  first, so the first tokens stay longest); `local_window`: the oldest;
- `h2o`: the least attention received per query that saw it, the current query included;
- `tova`: the least attention from the current query;
- `random`: a uniformly random one (a fixed key folded with the position).
Attention is averaged over each K/V head's query heads, as for compaction (`policies`).
`snapkv` cannot evict in context: it scores from the prompt's last window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.eviction.policies import STREAMING_SINKS
from kvjax.layers.dot_product import NEG_INF

IN_CONTEXT_POLICIES = ("streaming_llm", "local_window", "h2o", "tova", "random")


def random_scores(position: jax.Array, num_kv_heads: int, max_len: int) -> jax.Array:
  """`[K, S]` the random policy's scores when the token at `position` enters: one fixed key
  folded with the position, so the choice does not depend on chunking or the batch."""
  return jax.random.uniform(jax.random.fold_in(jax.random.key(0), position),
                            (num_kv_heads, max_len))


def _eviction_scores(policy: str, received_BxKxS: jax.Array, probs_BxKxS: jax.Array,
                     pos_B: jax.Array) -> jax.Array:
  """`[B, K, S]` finite scores (the lowest held one is evicted) once the token at `pos_B`
  entered: `received_BxKxS` is the attention each key got so far, `probs_BxKxS` the newest
  query's."""
  b, k, s = received_BxKxS.shape
  slot_S = jnp.arange(s)
  if policy == "streaming_llm":
    score_S = jnp.where(slot_S < STREAMING_SINKS, 2 * s - slot_S, slot_S)
    return jnp.broadcast_to(score_S.astype(jnp.float32), (b, k, s))
  if policy == "local_window":
    return jnp.broadcast_to(slot_S.astype(jnp.float32), (b, k, s))
  if policy == "h2o":  # the queries that saw a held key: every one from its own on
    return received_BxKxS / jnp.maximum(pos_B[:, None, None] - slot_S + 1, 1)
  if policy == "tova":
    return probs_BxKxS
  if policy == "random":
    return jax.vmap(random_scores, (0, None, None))(pos_B, k, s)
  raise ValueError(f"policy {policy!r} cannot evict in context; allowed: "
                   f"{', '.join(IN_CONTEXT_POLICIES)}")


def evict_in_context(policy: str, q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array,
                     v_BxSxKxD: jax.Array, q_pos_BxT: jax.Array, lengths_B: jax.Array,
                     sizes_B: jax.Array, held_BxKxS: jax.Array, received_BxKxS: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The chunk's queries (at consecutive `q_pos_BxT`, their keys already in the dense
  `k_BxSxKxD`) one at a time through caches of `sizes_B` tokens: `(out_BxTxHxD, held_BxKxS,
  received_BxKxS)`, the attention outputs, and the slots the caches hold and the attention
  every key received after the chunk. A query past its prompt's length (a pad) sees the cache
  and itself and changes nothing."""
  b, t, h, d = q_BxTxHxD.shape
  s, k = k_BxSxKxD.shape[1:3]
  slot_S = jnp.arange(s)

  def step(carry, inputs):
    held_BxKxS, received_BxKxS = carry
    q_BxHxD, pos_B = inputs
    own_Bx1xS = (slot_S == pos_B[:, None])[:, None]
    sees_BxKxS = held_BxKxS | own_Bx1xS
    logits_BxKxGxS = jnp.einsum("bkgd,bskd->bkgs", q_BxHxD.reshape(b, k, h // k, d), k_BxSxKxD,
                                preferred_element_type=jnp.float32) * (d ** -0.5)
    probs_BxKxGxS = jax.nn.softmax(jnp.where(sees_BxKxS[:, :, None], logits_BxKxGxS, NEG_INF),
                                   axis=-1)
    out_BxKxGxD = jnp.einsum("bkgs,bskd->bkgd", probs_BxKxGxS.astype(v_BxSxKxD.dtype), v_BxSxKxD,
                             preferred_element_type=jnp.float32)
    probs_BxKxS = probs_BxKxGxS.mean(axis=2)
    received = received_BxKxS + probs_BxKxS
    score_BxKxS = _eviction_scores(policy, received, probs_BxKxS, pos_B)
    victim_BxK = jnp.argmin(jnp.where(sees_BxKxS & ~own_Bx1xS, score_BxKxS, jnp.inf), axis=-1)
    over_BxK = sees_BxKxS.sum(axis=-1) > sizes_B[:, None]
    evicted_BxKxS = over_BxK[..., None] & (slot_S == victim_BxK[..., None])
    active_Bx1x1 = (pos_B < lengths_B)[:, None, None]
    held = jnp.where(active_Bx1x1, sees_BxKxS & ~evicted_BxKxS, held_BxKxS)
    received = jnp.where(active_Bx1x1, received, received_BxKxS)
    return (held, received), out_BxKxGxD.reshape(b, h, d)

  (held_BxKxS, received_BxKxS), out_TxBxHxD = jax.lax.scan(
      step, (held_BxKxS, received_BxKxS),
      (jnp.moveaxis(q_BxTxHxD, 1, 0), jnp.moveaxis(q_pos_BxT, 1, 0)))
  return jnp.moveaxis(out_TxBxHxD, 0, 1).astype(q_BxTxHxD.dtype), held_BxKxS, received_BxKxS
