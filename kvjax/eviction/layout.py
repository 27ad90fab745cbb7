"""Score-based K/V eviction as a cache layout (`model.eviction`). Under the compaction protocol
the prompt is prefilled into a dense buffer while every key's score accumulates from the rotated
queries the layout attends for (chunk by chunk, so the choice needs only prompt-length state);
`finish_prefill` then keeps exactly round(keep_ratio * prompt length) prompt tokens per
(sequence, K/V head), chosen by the policy, in a compacted layout (`kvjax.cache.compact`) that
decoded tokens are appended to. Under the in_context protocol the policy evicts while the prompt
goes in (`in_context`): the dense buffer still stores every token, and the layout carries what
each head holds across chunks; `finish_prefill` compacts exactly that.
Right-padded prompts give their lengths: pads are neither scored nor kept.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from kvjax.cache.compact import CompactLayout, compacted, compacted_best, keep_counts
from kvjax.cache.dense import DenseLayout, dense_layout
from kvjax.cache.storage import Storage
from kvjax.eviction.in_context import evict_in_context
from kvjax.eviction.policies import (ATTENTION_POLICIES, attention_probs, key_scores,
                                     observed_attention)
from kvjax.layers.cache import Chunk, Layout


@flax.struct.dataclass
class EvictionLayout(Layout):
  """A dense prefill buffer, the attention its keys received so far, and in context the tokens
  each head holds."""

  dense: DenseLayout
  # B x K x S float32, summed over the policy's queries and the readers (in context: over the
  # queries that saw each key)
  observed: jax.Array
  lengths: jax.Array  # B int32, prompt lengths
  held: jax.Array | None  # B x K x S bool: in context, the slots each head holds; else None
  policy: str = flax.struct.field(pytree_node=False)
  keep_ratio: float = flax.struct.field(pytree_node=False)
  readers: int = flax.struct.field(pytree_node=False)  # layers that read this buffer (CLA)

  def with_prompt_lengths(self, prompt_lengths_B: jax.Array) -> EvictionLayout:
    return self.replace(lengths=prompt_lengths_B)

  def write(self, chunk: Chunk) -> EvictionLayout:
    return self.replace(dense=self.dense.write(chunk))

  def attend(self, q_BxTxHxD: jax.Array, chunk: Chunk) -> tuple[jax.Array, EvictionLayout]:
    """Dense attention; the queries' attention to every key is added to its score, averaged
    over the layers that read this buffer. In context, each query sees what its head holds."""
    if self.held is not None:
      return self._attend_in_context(q_BxTxHxD, chunk.positions)
    out = self.dense.attend(q_BxTxHxD, chunk)[0]
    if self.policy not in ATTENTION_POLICIES:
      return out, self
    k_BxSxKxD = self.dense.storage.read(self.dense.k)
    b, s = k_BxSxKxD.shape[:2]
    slots_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    probs_BxKxTxS = attention_probs(q_BxTxHxD, k_BxSxKxD, chunk.positions, slots_BxS)
    observed = observed_attention(self.policy, probs_BxKxTxS, chunk.positions, self.lengths)
    return out, self.replace(observed=self.observed + observed / self.readers)

  def _attend_in_context(self, q_BxTxHxD: jax.Array,
                         positions_BxT: jax.Array) -> tuple[jax.Array, EvictionLayout]:
    """Each query over what its head holds and itself, then the policy evicts (one reader)."""
    read = self.dense.storage.read
    out, held, observed = evict_in_context(
        self.policy, q_BxTxHxD, read(self.dense.k), read(self.dense.v), positions_BxT,
        self.lengths, keep_counts(self.keep_ratio, self.lengths), self.held, self.observed)
    return out, self.replace(held=held, observed=observed)

  def finish_prefill(self, room: int, rng: jax.Array) -> CompactLayout:
    """The compacted layout of each sequence's chosen prompt tokens, with `room` more rows per
    head (host side: the sizes become static shapes)."""
    if self.held is not None:
      return compacted(self.dense, jnp.moveaxis(self.held, 1, 2), room, rng)
    return compacted_best(self.dense, key_scores(self.policy, self.observed, self.lengths, rng),
                          self.keep_ratio, self.lengths, room, rng)


def eviction_layout(batch: int, max_len: int, num_kv_heads: int, head_dim: int, storage: Storage,
                    *, policy: str, keep_ratio: float, readers: int, impl: str,
                    in_context: bool) -> EvictionLayout:
  """A prefill layout for `batch` prompts of up to `max_len` positions (prompt and decoded);
  `in_context` evicts while they go in."""
  shape = (batch, num_kv_heads, max_len)
  return EvictionLayout(
      dense=dense_layout(batch, max_len, num_kv_heads, head_dim, storage, impl),
      observed=jnp.zeros(shape, jnp.float32), lengths=jnp.full((batch,), max_len, jnp.int32),
      held=jnp.zeros(shape, bool) if in_context else None, policy=policy, keep_ratio=keep_ratio,
      readers=readers)
