"""The gate as a scorer (`model.attention_gate.protocol: compaction`): the prompt is prefilled
densely while the gate scores every token per K/V head; `finish_prefill` then keeps exactly
round(keep_ratio x prompt length) tokens per (sequence, K/V head): the sinks and the prompt's last
`recent` tokens first, then the best-scored. The count and the dense prefill are those of the
eviction policies' compaction (`kvjax.eviction`), so the two compare on equal terms.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from kvjax.cache.compact import CompactLayout, compacted_best
from kvjax.cache.dense import DenseLayout, dense_layout
from kvjax.cache.storage import Storage
from kvjax.layers.cache import Chunk, Layout


@flax.struct.dataclass
class ScoredLayout(Layout):
  """A dense prefill buffer and the gate's score of every token in it."""

  dense: DenseLayout
  score: jax.Array  # B x K x S float32; -inf where nothing was written
  lengths: jax.Array  # B int32 prompt lengths
  state: Any  # the gate's own K/V, so that a prompt prefilled in chunks is scored as if whole
  keep_ratio: float = flax.struct.field(pytree_node=False)
  recent: int = flax.struct.field(pytree_node=False)

  @property
  def filter_state(self) -> Any:
    return self.state

  def with_filter_state(self, state: Any) -> ScoredLayout:
    return self.replace(state=state)

  def with_prompt_lengths(self, prompt_lengths_B: jax.Array) -> ScoredLayout:
    return self.replace(lengths=prompt_lengths_B)

  def write(self, chunk: Chunk) -> ScoredLayout:
    b, t, k = chunk.score.shape
    at = (jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None], chunk.positions[:, None])
    score = self.score.at[at].set(jnp.moveaxis(chunk.score, 2, 1), mode="drop")
    return self.replace(dense=self.dense.write(chunk), score=score)

  def attend(self, q_BxTxHxD: jax.Array, chunk: Chunk) -> tuple[jax.Array, ScoredLayout]:
    return self.dense.attend(q_BxTxHxD, chunk)[0], self

  def finish_prefill(self, room: int, rng: jax.Array) -> CompactLayout:
    """The compacted layout of each sequence's chosen prompt tokens, with `room` more rows per
    head (host side)."""
    pos_S = jnp.arange(self.score.shape[-1])
    n_Bx1x1 = self.lengths[:, None, None]
    score_BxKxS = jnp.where(pos_S >= n_Bx1x1 - self.recent, jnp.inf, self.score)
    score_BxKxS = jnp.where(pos_S < n_Bx1x1, score_BxKxS, -jnp.inf)
    return compacted_best(self.dense, score_BxKxS, self.keep_ratio, self.lengths, room, rng)


def scored_layout(batch: int, max_len: int, num_kv_heads: int, head_dim: int, storage: Storage,
                  *, impl: str, state: Any, keep_ratio: float, recent: int) -> ScoredLayout:
  return ScoredLayout(
      dense=dense_layout(batch, max_len, num_kv_heads, head_dim, storage, impl),
      score=jnp.full((batch, num_kv_heads, max_len), -jnp.inf, jnp.float32),
      lengths=jnp.full((batch,), max_len, jnp.int32), state=state, keep_ratio=keep_ratio,
      recent=recent)
