"""MoA's layouts: a plan's windows over a whole sequence (training and scoring), and the decode
cache of per-head ring buffers with static sink slots.

Over a whole sequence (`MoAWindows`), each query head attends block-sparse: its sink block and
its band of local blocks, sized by the plan at final length N = T.

In the decode cache (`MoARing`), KV head k owns rows `[start_k, start_k + size_k)` of one flat
`[B, sum_k size_k, D]` buffer per producer layer (`kvjax.cache.flat`); sizes come from the plan at
the request's final length N (`max_len`) and differ per head, with no padding to the largest.
Position p goes to row `p` if p < sink, else to `sink + (p - sink) % (size_k - sink)`, so after
writing up to position t a head holds its sinks and its `size_k - sink` most recent tokens, and a
slot's position follows from t alone. A KV head is as large as the largest span among the query
heads that read it, over every layer that reads the buffer (CLA); a query head whose own span is
smaller masks the older slots.

A prompt (multi-token write) must start at position 0 and arrive in one write: it attends over its
own K/V with the block-sparse prefill, and the ring stores only what decode will read.
Right-padded prompts tell the cache their lengths, so pad tokens never displace real ones.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.flat import FlatHeads
from kvjax.cache.storage import Storage
from kvjax.config import ModelConfig
from kvjax.layers.cache import Chunk, Layout
from kvjax.layers.kv_sharing import readers
from kvjax.moa.masks import decode_mask
from kvjax.moa.plan import Plan, cache_size
from kvjax.moa.prefill import block_sparse_attention


def _num_local(head_sizes: tuple[int, ...], sink: int, block: int) -> tuple[int, ...]:
  """Per query head, prefill blocks in the local band (the sink block is extra)."""
  return tuple(-(-(s - sink) // block) for s in head_sizes)


@flax.struct.dataclass
class MoAWindows(Layout):
  """One layer's rules over a whole sequence from position 0, at final length N = T."""

  alphas: tuple[float, ...] = flax.struct.field(pytree_node=False)  # per query head
  betas: tuple[float, ...] = flax.struct.field(pytree_node=False)
  block: int = flax.struct.field(pytree_node=False)
  sink: int = flax.struct.field(pytree_node=False)

  def write(self, chunk: Chunk) -> MoAWindows:  # noqa: ARG002 (attention reads the chunk)
    return self

  def attend(self, q_BxTxHxD: jax.Array, chunk: Chunk) -> tuple[jax.Array, MoAWindows]:
    n = q_BxTxHxD.shape[1]
    span_H = np.floor(np.asarray(self.alphas) + np.asarray(self.betas) * n).astype(np.int64)
    sizes = tuple(int(s) for s in cache_size(span_H, n, self.block))
    out = block_sparse_attention(q_BxTxHxD, chunk.k, chunk.v,
                                 _num_local(sizes, self.sink, self.block), block=self.block,
                                 sink=self.sink)
    return out, self


def window_layouts(cfg: ModelConfig, plan: Plan) -> tuple[MoAWindows, ...]:
  """Per layer, its rules as a whole-sequence layout."""
  return tuple(MoAWindows(alphas=a, betas=b, block=cfg.moa.block_size, sink=cfg.moa.sink_tokens)
               for a, b in zip(plan.alphas, plan.betas))


@flax.struct.dataclass
class MoARing(Layout):
  """A producer's ring buffers, read by each layer of its group with that layer's windows."""

  k: Any  # B x sum_k size_k x D rotated keys, as `storage` holds them
  v: Any  # B x sum_k size_k x D
  prompt_lengths: jax.Array  # B int32: a multi-token write stores positions below this only
  heads: FlatHeads = flax.struct.field(pytree_node=False)  # per KV head: ring size (sinks too)
  storage: Storage = flax.struct.field(pytree_node=False)
  head_sizes: tuple[tuple[int, ...], ...] = flax.struct.field(pytree_node=False)  # reader, q head
  readers: tuple[int, ...] = flax.struct.field(pytree_node=False)  # layers reading this buffer
  reader: int = flax.struct.field(pytree_node=False)  # the one attending now (`for_layer`)
  sink: int = flax.struct.field(pytree_node=False)
  block: int = flax.struct.field(pytree_node=False)
  impl: str = flax.struct.field(pytree_node=False)
  max_len: int = flax.struct.field(pytree_node=False)  # N, the plan's final length

  prefill_in_one_write = True

  @property
  def sizes(self) -> tuple[int, ...]:
    """The attending layer's slots per query head (sink + window)."""
    return self.head_sizes[self.readers.index(self.reader)]

  def for_layer(self, layer: int) -> MoARing:
    return self.replace(reader=layer)

  def with_prompt_lengths(self, prompt_lengths_B: jax.Array) -> MoARing:
    return self.replace(prompt_lengths=prompt_lengths_B)

  def _rows(self, positions_BxT: jax.Array) -> jax.Array:
    """`[B, T, K]` buffer row of every position, or an out-of-range row where it is not kept."""
    sink, size_K = self.sink, np.asarray(self.heads.sizes)
    ring_K = size_K - sink
    p = positions_BxT[..., None]
    slot_BxTxK = jnp.where(p < sink, p, sink + (p - sink) % ring_K)
    limit_B = self.prompt_lengths if positions_BxT.shape[1] > 1 else jnp.full_like(
        self.prompt_lengths, np.iinfo(np.int32).max)
    last_Bx1x1 = (jnp.minimum(limit_B, positions_BxT[:, -1] + 1) - 1)[:, None, None]
    kept = (p < limit_B[:, None, None]) & ((p < sink) | (p > last_Bx1x1 - ring_K))
    return jnp.where(kept, self.heads.offsets[:-1] + slot_BxTxK, self.heads.num_rows)

  def write(self, chunk: Chunk) -> MoARing:
    at = self.heads.at(self._rows(chunk.positions))
    return self.replace(k=self.storage.put(self.k, at, chunk.k),
                        v=self.storage.put(self.v, at, chunk.v))

  def attend(self, q_BxTxHxD: jax.Array, chunk: Chunk) -> tuple[jax.Array, MoARing]:
    if q_BxTxHxD.shape[1] > 1:  # the prompt, from position 0: block-sparse over its own K/V
      return block_sparse_attention(q_BxTxHxD, chunk.k, chunk.v,
                                    _num_local(self.sizes, self.sink, self.block),
                                    block=self.block, sink=self.sink), self
    g = q_BxTxHxD.shape[2] // len(self.heads.sizes)
    uniform = all(s == self.heads.sizes[h // g] for h, s in enumerate(self.sizes))
    if self.impl == "pallas" and uniform:  # every query head reads all of its KV head's slots
      num_tokens_BxK = jnp.minimum(chunk.positions[:, :1] + 1, jnp.asarray(self.heads.sizes))
      operand = self.storage.kernel_operand
      return self.heads.decode(q_BxTxHxD, operand(self.k), operand(self.v), num_tokens_BxK,
                               self.block), self
    k_BxNxD, v_BxNxD = self.storage.read(self.k), self.storage.read(self.v)
    return self._attend_jnp(q_BxTxHxD, k_BxNxD, v_BxNxD, chunk.positions, g), self

  def _attend_jnp(self, q_BxTxHxD: jax.Array, k_BxNxD: jax.Array, v_BxNxD: jax.Array,
                  positions_BxT: jax.Array, g: int) -> jax.Array:
    """Each KV head's rows, positions recovered from the query position, per-head windows."""
    t_Bx1 = positions_BxT[:, -1:]
    windows = tuple(s - self.sink for s in self.sizes)

    def mask_of(h: int, rows: slice) -> jax.Array:
      j_S = np.arange(rows.stop - rows.start)
      ring = len(j_S) - self.sink
      pos_BxS = jnp.where(j_S < self.sink, j_S,
                          t_Bx1 - (t_Bx1 - self.sink - (j_S - self.sink)) % ring)
      pos_BxS = jnp.where((j_S >= self.sink) & (pos_BxS < self.sink), -1, pos_BxS)
      visible_BxGxTxS = decode_mask(positions_BxT, pos_BxS, windows[h * g:(h + 1) * g], self.sink)
      return visible_BxGxTxS & (pos_BxS >= 0)[:, None, None]

    return self.heads.attend(q_BxTxHxD, k_BxNxD, v_BxNxD, mask_of)


def ring_layouts(cfg: ModelConfig, plan: Plan, batch: int, max_len: int, impl: str,
                 storage: Storage) -> tuple[MoARing, ...]:
  """Zeroed ring buffers, one per producer layer, sized by `plan` for requests of final length
  `max_len`: each KV head as large as the largest span among the query heads that read it."""
  sizes_LxH = plan.cache_sizes(max_len, cfg.moa.block_size)
  g = cfg.num_heads // cfg.num_kv_heads
  rings = []
  for layers in readers(cfg.producer_of):
    kv_K = sizes_LxH[list(layers)].reshape(len(layers), cfg.num_kv_heads, g).max(axis=(0, 2))
    heads = FlatHeads(tuple(int(s) for s in kv_K))
    rings.append(MoARing(
        k=heads.zeros(batch, cfg.head_dim_, storage), v=heads.zeros(batch, cfg.head_dim_, storage),
        prompt_lengths=jnp.full((batch,), max_len, jnp.int32), heads=heads, storage=storage,
        head_sizes=tuple(tuple(int(s) for s in sizes_LxH[layer]) for layer in layers),
        readers=layers, reader=layers[0], sink=cfg.moa.sink_tokens, block=cfg.moa.block_size,
        impl=impl, max_len=max_len))
  return tuple(rings)
