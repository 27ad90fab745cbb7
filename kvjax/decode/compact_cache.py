"""Compacted survivors: each (layer, K/V head) holds only the tokens kept for it, no padding to
the longest head.

A layer's heads share one flat buffer: head h owns rows `[offset_h, offset_h + size_h)` of
`k`, `v` (`[B, N, D]`, N = sum of sizes) and `pos` (`[B, N]`, each row's token position).
Within a head the kept tokens form a prefix in position order; `pos` marks the rest EMPTY.
A token that was written but not kept stays in the row after the prefix with position
`-(p + 1)`, visible to its own query only (a query always sees itself), until the next write.

Lifecycle: `init_compact_cache` gives every head room for the whole context; prefill writes the
prompt with the gate's keep flags; `after_prefill(room)` (host side, once the counts are known)
cuts every head to what it kept plus `room` rows for decoded tokens. Decoded tokens are appended
(or, with `attention_gate.gate_decode`, gated too). Writing at position p first drops every row
at position >= p, so right-padded prompts lose their pads to the first decoded token.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig
from kvjax.decode.cache import DenseLayerCache, resolve_impl, tree_nbytes
from kvjax.layers.attention import dot_product_attention

EMPTY = 2**30  # position of an unused row: after every query
PALLAS_BLOCK = 64  # rows per block of the block-sparse decode kernel; head sizes align to it


def _offsets(sizes: tuple[int, ...]) -> np.ndarray:
  return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)


def _visible(pos_BxS: jax.Array, q_pos_BxT: jax.Array) -> jax.Array:
  """Kept rows at or before the query, and the query's own row."""
  q = q_pos_BxT[:, :, None]
  pos = pos_BxS[:, None, :]
  return ((pos >= 0) & (pos <= q)) | (pos == -(q + 1))


@flax.struct.dataclass
class CompactLayerCache:
  k: jax.Array  # B x N x D, rotated keys
  v: jax.Array  # B x N x D
  pos: jax.Array  # B x N int32: position of each row; EMPTY, or -(p + 1) for an unkept own row
  gate: DenseLayerCache | None  # the gate's own K/V, when decoded tokens are gated
  sizes: tuple[int, ...] = flax.struct.field(pytree_node=False)  # rows per K/V head
  use_keep: bool = flax.struct.field(pytree_node=False)  # writes honour keep flags
  align: int = flax.struct.field(pytree_node=False)  # head sizes are multiples of this

  @property
  def nbytes(self) -> int:
    return tree_nbytes(self)

  def kept_counts(self) -> np.ndarray:
    """`[B, K]` kept tokens per sequence and head (host side)."""
    valid = np.asarray(jax.device_get((self.pos >= 0) & (self.pos < EMPTY)), np.int32)
    return np.add.reduceat(valid, _offsets(self.sizes)[:-1], axis=1)

  def write(self, k_BxTxKxD, v_BxTxKxD, positions_BxT,
            keep_BxTxK: jax.Array | None = None) -> CompactLayerCache:
    """Writes a chunk of consecutive positions after each head's kept rows before them: kept
    tokens first (in order), then the unkept ones, which only their own queries see. Without
    keep flags (or after prefill, unless decoded tokens are gated) every token is kept."""
    b, t, num_heads, _ = k_BxTxKxD.shape
    offsets = _offsets(self.sizes)
    head_N = np.repeat(np.arange(num_heads), self.sizes)
    slot_N = np.arange(offsets[-1]) - offsets[head_N]
    kept_BxN = (self.pos >= 0) & (self.pos < positions_BxT[:, :1])
    start_BxK = jnp.stack([kept_BxN[:, offsets[h]:offsets[h + 1]].sum(axis=1)
                           for h in range(num_heads)], axis=1)
    if self.use_keep and keep_BxTxK is not None:
      keep_BxTxK = keep_BxTxK > 0.5
    else:
      keep_BxTxK = jnp.ones((b, t, num_heads), bool)
    n_kept_Bx1xK = keep_BxTxK.sum(axis=1, keepdims=True)
    rank_BxTxK = jnp.where(keep_BxTxK, jnp.cumsum(keep_BxTxK, axis=1) - 1,
                           n_kept_Bx1xK + jnp.cumsum(~keep_BxTxK, axis=1) - 1)
    slot_BxTxK = start_BxK[:, None, :] + rank_BxTxK
    row_BxTxK = jnp.where(slot_BxTxK < jnp.asarray(self.sizes), offsets[:-1] + slot_BxTxK,
                          offsets[-1])  # past a head's rows: dropped, not spilled
    b_Bx1x1 = jnp.arange(b)[:, None, None]
    p_BxTxK = jnp.broadcast_to(positions_BxT[:, :, None], keep_BxTxK.shape)
    pos = jnp.where(slot_N >= start_BxK[:, head_N], EMPTY, self.pos)
    pos = pos.at[b_Bx1x1, row_BxTxK].set(jnp.where(keep_BxTxK, p_BxTxK, -(p_BxTxK + 1)),
                                        mode="drop")
    put = lambda buf, new: buf.at[b_Bx1x1, row_BxTxK].set(new.astype(buf.dtype), mode="drop")
    return self.replace(k=put(self.k, k_BxTxKxD), v=put(self.v, v_BxTxKxD), pos=pos)

  def attend(self, q_BxTxHxD, positions_BxT, impl: str = "auto", kv=None) -> jax.Array:
    del kv  # the chunk was written here, its unkept tokens included
    num_heads = len(self.sizes)
    if q_BxTxHxD.shape[1] == 1 and resolve_impl(impl) == "pallas":
      return self._decode_pallas(q_BxTxHxD, positions_BxT)
    offsets = _offsets(self.sizes)
    group = q_BxTxHxD.shape[2] // num_heads
    outs = []
    for h in range(num_heads):
      rows = slice(int(offsets[h]), int(offsets[h + 1]))
      mask_BxTxS = _visible(self.pos[:, rows], positions_BxT)
      outs.append(dot_product_attention(q_BxTxHxD[:, :, h * group:(h + 1) * group],
                                        self.k[:, rows, None], self.v[:, rows, None], mask_BxTxS))
    return jnp.concatenate(outs, axis=2)

  def _decode_pallas(self, q_BxTxHxD, positions_BxT) -> jax.Array:
    """One query per sequence: each head's visible rows are a prefix of its range."""
    from kvjax.pallas_kernels.block_sparse_decode import (  # noqa: PLC0415
        block_sparse_decode, range_tables)
    offsets = _offsets(self.sizes)
    visible_BxN = _visible(self.pos, positions_BxT)[:, 0]
    num_tokens_BxK = jnp.stack([visible_BxN[:, offsets[h]:offsets[h + 1]].sum(axis=1)
                                for h in range(len(self.sizes))], axis=1).astype(jnp.int32)
    first_block_BxK = jnp.broadcast_to(jnp.asarray(offsets[:-1] // PALLAS_BLOCK),
                                       num_tokens_BxK.shape)
    tables = range_tables(first_block_BxK, max(self.sizes) // PALLAS_BLOCK)
    out_BxHxD = block_sparse_decode(q_BxTxHxD[:, 0], self.k, self.v, tables, num_tokens_BxK,
                                    block_size=PALLAS_BLOCK)
    return out_BxHxD[:, None]

  def after_prefill(self, room: int, use_keep: bool) -> CompactLayerCache:
    """Every head cut to the most any sequence kept plus `room` rows (host side)."""
    counts = self.kept_counts().max(axis=0)
    sizes = tuple(int(-(-(c + room) // self.align) * self.align) for c in counts)
    offsets = _offsets(self.sizes)

    def cut(buf, fill):
      parts = []
      for h, size in enumerate(sizes):
        part = buf[:, offsets[h]:offsets[h] + min(size, self.sizes[h])]
        pad = [(0, 0), (0, size - part.shape[1])] + [(0, 0)] * (buf.ndim - 2)
        parts.append(jnp.pad(part, pad, constant_values=fill))
      return jnp.concatenate(parts, axis=1)

    return CompactLayerCache(k=cut(self.k, 0), v=cut(self.v, 0), pos=cut(self.pos, EMPTY),
                             gate=self.gate if use_keep else None, sizes=sizes,
                             use_keep=use_keep, align=self.align)


@flax.struct.dataclass
class CompactKVCache:
  """The model's cache when K/V are evicted: one `CompactLayerCache` per layer that owns K/V."""

  layers: tuple
  max_len: int = flax.struct.field(pytree_node=False)  # positions the cache was made for
  gate_decode: bool = flax.struct.field(pytree_node=False)

  @property
  def nbytes(self) -> int:
    return sum(layer.nbytes for layer in self.layers)

  def kept_counts(self) -> np.ndarray:
    """`[L_kv, B, K]` tokens kept per layer, sequence and head."""
    return np.stack([layer.kept_counts() for layer in self.layers])

  def after_prefill(self, room: int) -> CompactKVCache:
    """Shrinks every (layer, head) to its survivors plus `room` decoded tokens."""
    return self.replace(layers=tuple(layer.after_prefill(room, self.gate_decode)
                                     for layer in self.layers))


def init_compact_cache(cfg: ModelConfig, batch: int, max_len: int) -> CompactKVCache:
  """A cache whose heads each have room for `max_len` tokens: what prefill needs before the
  gate has decided; `after_prefill` shrinks it."""
  g = cfg.attention_gate
  align = PALLAS_BLOCK if resolve_impl(cfg.attention_impl) == "pallas" else 1
  size = -(-max_len // align) * align
  k = cfg.num_kv_heads
  dtype = jnp.dtype(cfg.cache_dtype)
  buf = lambda: jnp.zeros((batch, k * size, cfg.head_dim_), dtype)
  gate_shape = (batch, max_len, g.num_heads, g.head_dim)

  def gate_cache():
    return DenseLayerCache(k=jnp.zeros(gate_shape, dtype), v=jnp.zeros(gate_shape, dtype))

  return CompactKVCache(
      layers=tuple(CompactLayerCache(k=buf(), v=buf(), pos=jnp.full((batch, k * size), EMPTY,
                                                                    jnp.int32),
                                     gate=gate_cache() if g.gate_decode else None,
                                     sizes=(size,) * k, use_keep=True, align=align)
                   for _ in range(cfg.num_kv_layers)),
      max_len=max_len, gate_decode=g.gate_decode)
