"""MoA decode cache: per-head ring buffers with static sink slots, one flat buffer per layer.

KV head k owns rows `[start_k, start_k + size_k)` of a layer's `[B, sum_k size_k, D]` buffers;
sizes come from the plan at the request's final length N (`max_len`) and differ per head, with
no padding to the largest. Position p goes to row `p` if p < sink, else to
`sink + (p - sink) % (size_k - sink)`, so after writing up to position t a head holds its sinks
and its `size_k - sink` most recent tokens, and a slot's position follows from t alone.
A query head whose own span is smaller than its KV head's (GQA with mixed rules) masks the
older slots.

A prompt (multi-token write) must start at position 0: it attends over its own K/V with the
block-sparse prefill and stores only what decode will read. Right-padded prompts tell the cache
their lengths (`with_prompt_lengths`), so pad tokens never displace real ones.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig
from kvjax.decode.cache import KVCache, resolve_impl, tree_nbytes
from kvjax.layers.attention import dot_product_attention
from kvjax.moa.masks import decode_mask
from kvjax.moa.plan import LayerLayout, layer_layouts
from kvjax.moa.prefill import block_sparse_attention


@flax.struct.dataclass
class MoALayerCache:
  k: jax.Array  # B x sum_k size_k x D, rotated keys
  v: jax.Array  # B x sum_k size_k x D
  prompt_lengths: jax.Array  # B int32: a multi-token write stores positions below this only
  layout: LayerLayout = flax.struct.field(pytree_node=False)
  max_len: int = flax.struct.field(pytree_node=False)  # N, the plan's final length

  @property
  def nbytes(self) -> int:
    return tree_nbytes(self)

  @property
  def starts(self) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(self.layout.kv_sizes)[:-1]])

  def _rows(self, positions_BxT: jax.Array) -> jax.Array:
    """`[B, T, K]` buffer row of every position, or an out-of-range row where it is not kept."""
    sink = self.layout.sink
    size_K = np.asarray(self.layout.kv_sizes)
    ring_K = size_K - sink
    p = positions_BxT[..., None]
    slot_BxTxK = jnp.where(p < sink, p, sink + (p - sink) % ring_K)
    limit_B = self.prompt_lengths if positions_BxT.shape[1] > 1 else jnp.full_like(
        self.prompt_lengths, np.iinfo(np.int32).max)
    last_Bx1x1 = (jnp.minimum(limit_B, positions_BxT[:, -1] + 1) - 1)[:, None, None]
    kept = (p < limit_B[:, None, None]) & ((p < sink) | (p > last_Bx1x1 - ring_K))
    return jnp.where(kept, self.starts + slot_BxTxK, self.k.shape[1])

  def write(self, k_BxTxKxD, v_BxTxKxD, positions_BxT) -> MoALayerCache:
    rows_BxTxK = self._rows(positions_BxT)
    b_Bx1x1 = jnp.arange(k_BxTxKxD.shape[0])[:, None, None]
    put = lambda buf, new: buf.at[b_Bx1x1, rows_BxTxK].set(new.astype(buf.dtype), mode="drop")
    return self.replace(k=put(self.k, k_BxTxKxD), v=put(self.v, v_BxTxKxD))

  def attend(self, q_BxTxHxD, positions_BxT, impl: str = "auto", kv=None) -> jax.Array:
    layout = self.layout
    if q_BxTxHxD.shape[1] > 1:
      return block_sparse_attention(q_BxTxHxD, *kv, layout.num_local_blocks, block=layout.block,
                                    sink=layout.sink)
    if resolve_impl(impl) == "pallas" and layout.uniform_groups:
      return self._attend_kernel(q_BxTxHxD, positions_BxT)[:, None]
    return self._attend_jnp(q_BxTxHxD, positions_BxT)

  def _attend_kernel(self, q_BxTxHxD, positions_BxT) -> jax.Array:
    from kvjax.pallas_kernels import block_sparse_decode, range_tables  # noqa: PLC0415

    layout, b = self.layout, q_BxTxHxD.shape[0]
    first_BxK = jnp.broadcast_to(jnp.asarray(self.starts // layout.block, jnp.int32),
                                 (b, len(layout.kv_sizes)))
    tables_BxKxM = range_tables(first_BxK, max(layout.kv_sizes) // layout.block)
    num_tokens_BxK = jnp.minimum(positions_BxT[:, :1] + 1, jnp.asarray(layout.kv_sizes))
    return block_sparse_decode(q_BxTxHxD[:, 0], self.k, self.v, tables_BxKxM, num_tokens_BxK,
                               block_size=layout.block)

  def _attend_jnp(self, q_BxTxHxD, positions_BxT) -> jax.Array:
    """Each KV head's rows, positions recovered from the query position, per-head windows."""
    layout = self.layout
    g = q_BxTxHxD.shape[2] // len(layout.kv_sizes)
    t_BxT = positions_BxT
    outs = []
    for kh, (start, size) in enumerate(zip(self.starts, layout.kv_sizes)):
      j_S = np.arange(size)
      ring = size - layout.sink
      r_S = j_S - layout.sink
      pos_BxS = jnp.where(j_S < layout.sink, j_S,
                          t_BxT[:, -1:] - (t_BxT[:, -1:] - layout.sink - r_S) % ring)
      pos_BxS = jnp.where((j_S >= layout.sink) & (pos_BxS < layout.sink), -1, pos_BxS)
      windows = layout.windows[kh * g:(kh + 1) * g]
      mask_BxGxTxS = decode_mask(t_BxT, pos_BxS, windows, layout.sink) & (pos_BxS >= 0)[:, None,
                                                                                          None]
      rows = slice(int(start), int(start + size))
      outs.append(dot_product_attention(q_BxTxHxD[:, :, kh * g:(kh + 1) * g],
                                        self.k[:, rows, None], self.v[:, rows, None],
                                        mask_BxGxTxS))
    return jnp.concatenate(outs, axis=2)


@flax.struct.dataclass
class MoACache(KVCache):
  """The model's cache under a MoA plan: one `MoALayerCache` per layer."""

  whole_prompt_prefill = True  # a multi-token write attends over its own K/V only

  def with_prompt_lengths(self, prompt_lengths_B: jax.Array) -> MoACache:
    lengths = jnp.asarray(prompt_lengths_B, jnp.int32)  # a copy per layer: caches are donated
    return self.replace(layers=tuple(layer.replace(prompt_lengths=jnp.array(lengths, copy=True))
                                     for layer in self.layers))


def init_moa_cache(cfg: ModelConfig, batch: int, max_len: int) -> MoACache:
  """Zeroed buffers sized by `cfg.moa_plan` for requests of final length `max_len`."""
  if max_len > cfg.max_seq_len:
    raise ValueError(f"cache max_len={max_len} exceeds model.max_seq_len={cfg.max_seq_len}")
  dtype = jnp.dtype(cfg.cache_dtype)
  layers = []
  for layout in layer_layouts(cfg, max_len):
    shape = (batch, sum(layout.kv_sizes), cfg.head_dim_)
    layers.append(MoALayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                                prompt_lengths=jnp.full((batch,), max_len, jnp.int32),
                                layout=layout, max_len=max_len))
  return MoACache(layers=tuple(layers))
