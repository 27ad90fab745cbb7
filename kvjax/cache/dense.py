"""Dense cache layout: a `[B, S, K, D]` K/V buffer pair per layer that owns K/V.

Slot s holds the token at position s, so the causal mask is just `slot <= query position`.
Prompts of different lengths are right-padded: a pad token's slot is overwritten by the
first generated token of that sequence before any query can see it.

With scanned layers (`model.scan_layers`) the producers' buffers are one `[G, B, S, K, D]`
stack that the scan carries: group g writes its new rows in place at index g, so a decode step
moves only those rows instead of slicing out and restacking the whole cache.

This module is a leaf among the layouts: it imports no other cache kind.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from kvjax.cache.storage import Storage
from kvjax.layers.cache import Cache, Chunk, Layout
from kvjax.layers.dot_product import causal_mask, dot_product_attention
from kvjax.pallas_kernels.shared_kv_decode import shared_kv_decode


def _slots(chunk: Chunk) -> tuple[jax.Array, jax.Array]:
  """The `(sequence, slot)` index of every token of a chunk of consecutive positions."""
  b, t = chunk.positions.shape
  return (jnp.arange(b)[:, None],
          chunk.positions[:, :1] + jnp.arange(t, dtype=chunk.positions.dtype))


def dense_attend(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                 positions_BxT: jax.Array) -> jax.Array:
  """Queries at `positions_BxT` over slots `<= position` (the jnp path)."""
  b, s = k_BxSxKxD.shape[:2]
  slots_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  return dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD,
                               causal_mask(positions_BxT, slots_BxS))


@flax.struct.dataclass
class DenseLayout(Layout):
  k: Any  # B x S x K x D rotated keys, as `storage` holds them
  v: Any  # B x S x K x D
  storage: Storage = flax.struct.field(pytree_node=False)
  impl: str = flax.struct.field(pytree_node=False)  # xla | pallas

  @property
  def max_len(self) -> int:
    return jax.tree.leaves(self.k)[0].shape[1]

  def write(self, chunk: Chunk) -> DenseLayout:
    """Stores a chunk of consecutive positions per sequence (prefill or one decode step)."""
    at = _slots(chunk)
    return self.replace(k=self.storage.put(self.k, at, chunk.k),
                        v=self.storage.put(self.v, at, chunk.v))

  def attend(self, q_BxTxHxD: jax.Array, chunk: Chunk) -> tuple[jax.Array, DenseLayout]:
    """The Pallas kernel for one query per sequence under `impl="pallas"` (reading what the
    storage hands it), the jnp path over the stored values otherwise."""
    positions_BxT = chunk.positions
    if q_BxTxHxD.shape[1] == 1 and self.impl == "pallas":
      operand = self.storage.kernel_operand
      out_BxHxD = shared_kv_decode(q_BxTxHxD[:, 0], operand(self.k), operand(self.v),
                                   positions_BxT[:, 0] + 1)
      return out_BxHxD[:, None], self
    read = self.storage.read
    return dense_attend(q_BxTxHxD, read(self.k), read(self.v), positions_BxT), self


def dense_layout(batch: int, max_len: int, num_kv_heads: int, head_dim: int, storage: Storage,
                 impl: str = "xla") -> DenseLayout:
  """A zeroed `[B, S, K, D]` layout."""
  shape = (batch, max_len, num_kv_heads, head_dim)
  return DenseLayout(k=storage.zeros(shape), v=storage.zeros(shape), storage=storage, impl=impl)


@flax.struct.dataclass
class StackedKVCache(Cache):
  """Every producer's dense buffers stacked on a leading axis, for scanned layers."""

  k: Any  # G x B x S x K x D rotated keys, as `storage` holds them
  v: Any  # G x B x S x K x D
  storage: Storage = flax.struct.field(pytree_node=False)
  impl: str = flax.struct.field(pytree_node=False)

  @property
  def max_len(self) -> int:
    return jax.tree.leaves(self.k)[0].shape[2]

  def layer(self, index: jax.Array) -> StackedLayout:
    """Group `index`'s buffer (a traced index: the scan's step)."""
    return StackedLayout(stack=self, index=index)


@flax.struct.dataclass
class StackedLayout(Layout):
  """Buffer `index` of a stack as one layer's layout; `stack` is the updated whole."""

  stack: StackedKVCache
  index: jax.Array  # int32 scalar, the group's place in the scan

  def write(self, chunk: Chunk) -> StackedLayout:
    """One scatter into buffer `index` of the stack (a vmap over its batch axis would transpose
    the whole stack)."""
    stack, at = self.stack, (self.index, *_slots(chunk))
    return self.replace(stack=stack.replace(k=stack.storage.put(stack.k, at, chunk.k),
                                            v=stack.storage.put(stack.v, at, chunk.v)))

  def attend(self, q_BxTxHxD: jax.Array, chunk: Chunk) -> tuple[jax.Array, StackedLayout]:
    """The kernel reads the group's buffer in place; the jnp path reads it sliced out."""
    stack, positions_BxT = self.stack, chunk.positions
    if q_BxTxHxD.shape[1] == 1 and stack.impl == "pallas":
      operand = stack.storage.kernel_operand
      out_BxHxD = shared_kv_decode(q_BxTxHxD[:, 0], operand(stack.k), operand(stack.v),
                                   positions_BxT[:, 0] + 1, stack_index=self.index)
      return out_BxHxD[:, None], self
    take = lambda x: jax.lax.dynamic_index_in_dim(x, self.index, keepdims=False)
    layer = lambda buf: stack.storage.read(jax.tree.map(take, buf))
    return dense_attend(q_BxTxHxD, layer(stack.k), layer(stack.v), positions_BxT), self


def stacked_cache(groups: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                  storage: Storage, impl: str = "xla") -> StackedKVCache:
  shape = (groups, batch, max_len, num_kv_heads, head_dim)
  return StackedKVCache(k=storage.zeros(shape), v=storage.zeros(shape), storage=storage,
                        impl=impl)
