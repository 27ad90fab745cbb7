"""Score-based K/V eviction as a cache layout (`model.eviction`): the prompt is prefilled into a
dense buffer while every key's score accumulates from the rotated queries the layout attends
for (chunk by chunk, so the choice needs only prompt-length state); `finish_prefill` then keeps
exactly round(keep_ratio * prompt length) prompt tokens per (sequence, K/V head), chosen by the
policy, in a compacted layout (`kvjax.cache.compact`) that decoded tokens are appended to.
Right-padded prompts give their lengths: pads are neither scored nor kept.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from kvjax.cache.compact import CompactLayout, compacted
from kvjax.cache.dense import DenseLayout, dense_layout
from kvjax.cache.storage import Storage
from kvjax.eviction.policies import (ATTENTION_POLICIES, attention_probs, keep_counts, keep_top,
                                     key_scores, observed_attention)
from kvjax.layers.cache import Chunk, Layout


@flax.struct.dataclass
class EvictionLayout(Layout):
  """A dense prefill buffer, and the attention its keys received so far."""

  dense: DenseLayout
  observed: jax.Array  # B x K x S float32, summed over the policy's queries and the readers
  lengths: jax.Array  # B int32, prompt lengths
  policy: str = flax.struct.field(pytree_node=False)
  keep_ratio: float = flax.struct.field(pytree_node=False)
  readers: int = flax.struct.field(pytree_node=False)  # layers that read this buffer (CLA)

  def with_prompt_lengths(self, prompt_lengths_B: jax.Array) -> EvictionLayout:
    return self.replace(lengths=prompt_lengths_B)

  def write(self, chunk: Chunk) -> EvictionLayout:
    return self.replace(dense=self.dense.write(chunk))

  def attend(self, q_BxTxHxD: jax.Array, chunk: Chunk) -> tuple[jax.Array, EvictionLayout]:
    """Dense attention; the queries' attention to every key is added to its score, averaged
    over the layers that read this buffer."""
    out = self.dense.attend(q_BxTxHxD, chunk)[0]
    if self.policy not in ATTENTION_POLICIES:
      return out, self
    k_BxSxKxD = self.dense.storage.read(self.dense.k)
    b, s = k_BxSxKxD.shape[:2]
    slots_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    probs_BxKxTxS = attention_probs(q_BxTxHxD, k_BxSxKxD, chunk.positions, slots_BxS)
    observed = observed_attention(self.policy, probs_BxKxTxS, chunk.positions, self.lengths)
    return out, self.replace(observed=self.observed + observed / self.readers)

  def finish_prefill(self, room: int, rng: jax.Array) -> CompactLayout:
    """The compacted layout of each sequence's chosen prompt tokens, with `room` more rows per
    head (host side: the sizes become static shapes)."""
    score_BxKxS = key_scores(self.policy, self.observed, self.lengths, rng)
    return compacted(self.dense, keep_top(score_BxKxS, keep_counts(self.keep_ratio, self.lengths)),
                     room, rng)


def eviction_layout(batch: int, max_len: int, num_kv_heads: int, head_dim: int, storage: Storage,
                    *, policy: str, keep_ratio: float, readers: int,
                    impl: str) -> EvictionLayout:
  """A prefill layout for `batch` prompts of up to `max_len` positions (prompt and decoded)."""
  return EvictionLayout(
      dense=dense_layout(batch, max_len, num_kv_heads, head_dim, storage, impl),
      observed=jnp.zeros((batch, num_kv_heads, max_len), jnp.float32),
      lengths=jnp.full((batch,), max_len, jnp.int32), policy=policy, keep_ratio=keep_ratio,
      readers=readers)
