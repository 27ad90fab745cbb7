"""Compacted survivors: each (layer, K/V head) holds only the tokens kept for it, in one flat
buffer (`kvjax.cache.flat`) where heads own row ranges of their own size.

Head h's rows also carry `pos` (`[B, N]`, each row's token position). Within a head the kept
tokens form a prefix in position order; `pos` marks the rest EMPTY. A token that was written but
not kept stays in a row after the prefix with position `-(p + 1)`, visible to the queries at most
`recent` positions after it (its own at least), for as long as one of those can still come: the
rows after the prefix hold, in position order, the unkept tokens still in the window of the
next write, then the unkept tokens of the last one.

Lifecycle: `compact_layout` gives every head room for the whole request; prefill writes the
prompt with the chunk's keep flags (an attention gate's, or a policy's at compaction);
`finish_prefill(room, rng)` (host side, once the counts are known) cuts every head to what it kept
plus `room` rows for decoded tokens. Decoded tokens are appended, or gated too (`gated_decode`,
when the filter keeps its own state). Writing at position p first drops every row at position
>= p, so right-padded prompts lose their pads to the first decoded token.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.dense import DenseLayout
from kvjax.cache.flat import FlatHeads
from kvjax.cache.storage import Storage
from kvjax.layers.cache import Chunk, Layout
from kvjax.pallas_kernels.eligibility import TABLE_BLOCK  # rows per kernel block: heads align

EMPTY = 2**30  # position of an unused row: after every query


def _visible(pos_BxS: jax.Array, q_pos_BxT: jax.Array, recent: int) -> jax.Array:
  """`[B, T, S]`: kept rows at or before the query, and unkept rows at most `recent` positions
  before it (its own row included)."""
  q = q_pos_BxT[:, :, None]
  pos = pos_BxS[:, None, :]
  unkept_distance = q + pos + 1  # q - p for an unkept row at -(p + 1)
  return (((pos >= 0) & (pos <= q))
          | ((pos < 0) & (unkept_distance >= 0) & (unkept_distance <= recent)))


@flax.struct.dataclass
class CompactLayout(Layout):
  k: Any  # B x N x D rotated keys, as `storage` holds them
  v: Any  # B x N x D
  pos: jax.Array  # B x N int32: position of each row; EMPTY, or -(p + 1) for an unkept own row
  state: Any  # the K/V filter's own state (an attention gate's K/V), or None
  heads: FlatHeads = flax.struct.field(pytree_node=False)
  storage: Storage = flax.struct.field(pytree_node=False)
  use_keep: bool = flax.struct.field(pytree_node=False)  # writes honour the chunk's keep flags
  lengths: jax.Array | None  # B int32 prompt lengths, where a recent window needs them
  gated_decode: bool = flax.struct.field(pytree_node=False)  # they still do after prefill
  align: int = flax.struct.field(pytree_node=False)  # head sizes are multiples of this
  impl: str = flax.struct.field(pytree_node=False)
  recent: int = flax.struct.field(pytree_node=False)  # unkept tokens stay visible this far

  def with_prompt_lengths(self, prompt_lengths_B: jax.Array) -> CompactLayout:
    return self.replace(lengths=prompt_lengths_B) if self.recent else self

  def kept_counts(self) -> np.ndarray:
    """`[B, K]` kept tokens per sequence and head (host side)."""
    return np.asarray(jax.device_get(self.heads.count((self.pos >= 0) & (self.pos < EMPTY))))

  @property
  def filter_state(self) -> Any:
    return self.state

  def with_filter_state(self, state: Any) -> CompactLayout:
    return self.replace(state=state)

  def _window_moved(self, next_B: jax.Array, at_BxK: jax.Array) -> tuple[CompactLayout, jax.Array]:
    """The unkept rows that a query at `next_B` may still see (positions in `[next - recent,
    next)`) moved, in position order, to each head's slots from `at_BxK` on; returns the layout
    and `[B, K]` how many there are. Other rows stay (the caller overwrites or empties them)."""
    heads, n = self.heads, self.heads.num_rows
    head_N = heads.head_N
    written_BxN = -(self.pos + 1)
    next_Bx1 = next_B[:, None]
    moved_BxN = (self.pos < 0) & (written_BxN >= next_Bx1 - self.recent) & (written_BxN < next_Bx1)
    before_BxN = jnp.cumsum(moved_BxN, axis=1) - moved_BxN
    rank_BxN = before_BxN - before_BxN[:, heads.offsets[:-1]][:, head_N]
    slot_BxN = at_BxK[:, head_N] + rank_BxN
    to_BxN = jnp.where(moved_BxN & (slot_BxN < jnp.asarray(heads.sizes)[head_N]),
                       heads.offsets[head_N] + slot_BxN, n)
    b = self.pos.shape[0]
    from_BxN = jnp.broadcast_to(jnp.arange(n), (b, n)).at[jnp.arange(b)[:, None], to_BxN].set(
        jnp.arange(n), mode="drop")
    take = lambda x: jnp.take_along_axis(x, from_BxN.reshape(from_BxN.shape + (1,) * (x.ndim - 2)),
                                         axis=1)
    return (self.replace(k=jax.tree.map(take, self.k), v=jax.tree.map(take, self.v),
                         pos=take(self.pos)), heads.count(moved_BxN))

  def write(self, chunk: Chunk) -> CompactLayout:
    """Writes a chunk of consecutive positions after each head's kept rows before them: kept
    tokens first (in order), then the unkept ones still in the window, then the chunk's unkept
    ones. Without keep flags (or once prefill is over, unless decode is gated) every token is
    kept."""
    heads, positions_BxT = self.heads, chunk.positions
    b, t, num_heads, _ = chunk.k.shape
    start_BxK = heads.count((self.pos >= 0) & (self.pos < positions_BxT[:, :1]))
    if self.use_keep and chunk.keep is not None:
      keep_BxTxK = chunk.keep > 0.5
    else:
      keep_BxTxK = jnp.ones((b, t, num_heads), bool)
    n_kept_Bx1xK = keep_BxTxK.sum(axis=1, keepdims=True)
    layout, n_window_BxK = self, jnp.zeros_like(start_BxK)
    if self.recent:
      layout, n_window_BxK = self._window_moved(positions_BxT[:, 0], start_BxK + n_kept_Bx1xK[:, 0])
    unkept_from_Bx1xK = n_kept_Bx1xK + n_window_BxK[:, None]
    rank_BxTxK = jnp.where(keep_BxTxK, jnp.cumsum(keep_BxTxK, axis=1) - 1,
                           unkept_from_Bx1xK + jnp.cumsum(~keep_BxTxK, axis=1) - 1)
    slot_BxTxK = start_BxK[:, None, :] + rank_BxTxK
    row_BxTxK = jnp.where(slot_BxTxK < jnp.asarray(heads.sizes), heads.offsets[:-1] + slot_BxTxK,
                          heads.num_rows)  # past a head's rows: dropped, not spilled
    head_N, slot_N = heads.head_N, heads.slot_N
    p_BxTxK = jnp.broadcast_to(positions_BxT[:, :, None], keep_BxTxK.shape)
    pos = jnp.where(slot_N >= (start_BxK + n_window_BxK + t)[:, head_N], EMPTY, layout.pos)
    at = heads.at(row_BxTxK)
    pos = pos.at[at].set(jnp.where(keep_BxTxK, p_BxTxK, -(p_BxTxK + 1)), mode="drop")
    return layout.replace(k=self.storage.put(layout.k, at, chunk.k),
                          v=self.storage.put(layout.v, at, chunk.v), pos=pos)

  def attend(self, q_BxTxHxD: jax.Array, chunk: Chunk) -> tuple[jax.Array, CompactLayout]:
    """Each head's visible rows (the chunk was written here, its unkept tokens included); with
    one query per sequence they are a prefix of the head's rows, which the kernel reads."""
    positions_BxT = chunk.positions
    if q_BxTxHxD.shape[1] == 1 and self.impl == "pallas":
      num_tokens_BxK = self.heads.count(_visible(self.pos, positions_BxT, self.recent)[:, 0])
      operand = self.storage.kernel_operand
      return self.heads.decode(q_BxTxHxD, operand(self.k), operand(self.v), num_tokens_BxK,
                               TABLE_BLOCK), self
    k_BxNxD, v_BxNxD = self.storage.read(self.k), self.storage.read(self.v)
    mask_of = lambda h, rows: _visible(self.pos[:, rows], positions_BxT, self.recent)
    return self.heads.attend(q_BxTxHxD, k_BxNxD, v_BxNxD, mask_of), self

  def finish_prefill(self, room: int, rng: jax.Array) -> CompactLayout:  # noqa: ARG002
    """Every head cut to the most any sequence kept plus `room` rows, and `recent` more for the
    unkept tokens the next queries may still see (host side); the filter's state goes unless
    decoded tokens are gated too."""
    layout = self
    if self.recent:
      kept_BxN = (self.pos >= 0) & (self.pos < EMPTY)
      written_BxN = jnp.where(kept_BxN, self.pos, -(self.pos + 1))
      end_B = (written_BxN.max(axis=1) + 1 if self.lengths is None else self.lengths)
      layout, n_window_BxK = self._window_moved(end_B, self.heads.count(kept_BxN))
      last_BxN = (self.heads.count(kept_BxN) + n_window_BxK)[:, self.heads.head_N]
      layout = layout.replace(pos=jnp.where(self.heads.slot_N >= last_BxN, EMPTY, layout.pos))
    counts = layout.kept_counts().max(axis=0)
    sizes = tuple(int(-(-(c + room + self.recent) // self.align) * self.align) for c in counts)

    def cut(buf, fill):
      parts = []
      for h, size in enumerate(sizes):
        part = buf[:, self.heads.rows(h)][:, :size]
        pad = [(0, 0), (0, size - part.shape[1])] + [(0, 0)] * (buf.ndim - 2)
        parts.append(jnp.pad(part, pad, constant_values=fill))
      return jnp.concatenate(parts, axis=1)

    rows = lambda buf: jax.tree.map(lambda x: cut(x, 0), buf)
    return layout.replace(k=rows(layout.k), v=rows(layout.v), pos=cut(layout.pos, EMPTY),
                          state=self.state if self.gated_decode else None, lengths=None,
                          heads=FlatHeads(sizes), use_keep=self.gated_decode)


def compact_layout(batch: int, max_len: int, num_kv_heads: int, head_dim: int, storage: Storage,
                   *, impl: str = "xla", state: Any = None, gated_decode: bool = False,
                   recent: int = 0) -> CompactLayout:
  """Every head with room for `max_len` tokens: what prefill needs before the choice is made;
  `finish_prefill` shrinks it."""
  align = TABLE_BLOCK if impl == "pallas" else 1
  size = -(-max_len // align) * align
  heads = FlatHeads((size,) * num_kv_heads)
  return CompactLayout(k=heads.zeros(batch, head_dim, storage),
                       v=heads.zeros(batch, head_dim, storage),
                       pos=jnp.full((batch, heads.num_rows), EMPTY, jnp.int32), state=state,
                       lengths=None, heads=heads, storage=storage, use_keep=True,
                       gated_decode=gated_decode, align=align, impl=impl, recent=recent)


def compacted(dense: DenseLayout, keep_BxSxK: jax.Array, room: int,
              rng: jax.Array) -> CompactLayout:
  """The tokens of a dense prefill buffer flagged in `keep_BxSxK`, per (sequence, K/V head), in a
  compacted layout with `room` more rows per head (host side: the sizes become static shapes)."""
  k_BxSxKxD, v_BxSxKxD = dense.storage.read(dense.k), dense.storage.read(dense.v)
  b, s, num_kv_heads, head_dim = k_BxSxKxD.shape
  positions_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  fresh = compact_layout(b, s, num_kv_heads, head_dim, dense.storage, impl=dense.impl)
  chosen = fresh.write(Chunk(k_BxSxKxD, v_BxSxKxD, positions_BxS, keep_BxSxK))
  return chosen.finish_prefill(room, rng)


def compacted_best(dense: DenseLayout, score_BxKxS: jax.Array, keep_ratio: float,
                   lengths_B: jax.Array, room: int, rng: jax.Array) -> CompactLayout:
  """`compacted` keeping each sequence's round(keep_ratio x prompt length) best-scored tokens
  per K/V head: how every scorer of a dense prefill (eviction policies, the gate) compacts."""
  return compacted(dense, keep_top(score_BxKxS, keep_counts(keep_ratio, lengths_B)), room, rng)


def keep_top(score_BxKxS: jax.Array, counts_B: jax.Array) -> jax.Array:
  """`[B, S, K]` flags marking each sequence's `counts_B` best-scored keys per K/V head."""
  order_BxKxS = jnp.argsort(-score_BxKxS, axis=-1, stable=True)
  rank_BxKxS = jnp.argsort(order_BxKxS, axis=-1)
  return jnp.moveaxis(rank_BxKxS < counts_B[:, None, None], 1, 2)


def keep_counts(keep_ratio: float, lengths_B: jax.Array) -> jax.Array:
  """round(keep_ratio * prompt length), at least one token."""
  return jnp.maximum(jnp.round(keep_ratio * lengths_B), 1).astype(jnp.int32)
