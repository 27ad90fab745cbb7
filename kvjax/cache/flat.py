"""One flat K/V buffer whose KV heads own row ranges of different sizes (no padding to the
largest): what MoA's ring buffers and the compacted survivors of eviction both store.

Head h owns rows `[offsets[h], offsets[h + 1])` of a layer's `[B, N, D]` buffers. Its attention
reads only its own rows, under a mask its layout computes; the block-sparse Pallas kernel reads
each head's first rows through block tables built from the same offsets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.storage import Storage
from kvjax.layers.dot_product import dot_product_attention
from kvjax.pallas_kernels.block_sparse_decode import block_sparse_decode, range_tables


@dataclasses.dataclass(frozen=True)
class FlatHeads:
  """The row ranges of K KV heads in a flat buffer (static: part of a layout's pytree metadata)."""

  sizes: tuple[int, ...]  # rows per KV head

  @cached_property
  def offsets(self) -> np.ndarray:
    """`[K + 1]` int32: head h's rows start at offsets[h]; offsets[K] is N."""
    return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int32)

  @cached_property
  def head_N(self) -> np.ndarray:
    """`[N]`: the head that owns each row."""
    return np.repeat(np.arange(len(self.sizes)), self.sizes)

  @cached_property
  def slot_N(self) -> np.ndarray:
    """`[N]`: each row's index within its head's rows."""
    return np.arange(self.num_rows) - self.offsets[self.head_N]

  @property
  def num_rows(self) -> int:
    return int(self.offsets[-1])

  def rows(self, h: int) -> slice:
    return slice(int(self.offsets[h]), int(self.offsets[h + 1]))

  def zeros(self, batch: int, head_dim: int, storage: Storage) -> Any:
    return storage.zeros((batch, self.num_rows, head_dim))

  @staticmethod
  def at(rows_BxTxK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The index that puts each (sequence, token, head)'s entry in its row (rows >= N: none)."""
    return jnp.arange(rows_BxTxK.shape[0])[:, None, None], rows_BxTxK

  def count(self, flags_BxN: jax.Array) -> jax.Array:
    """`[B, K]` int32: per head, the rows whose flag is set."""
    return jnp.stack([flags_BxN[:, self.rows(h)].sum(axis=1) for h in range(len(self.sizes))],
                     axis=1).astype(jnp.int32)

  def attend(self, q_BxTxHxD: jax.Array, k_BxNxD: jax.Array, v_BxNxD: jax.Array,
             mask_of: Callable[[int, slice], jax.Array]) -> jax.Array:
    """Head h's queries over head h's rows under `mask_of(h, rows)`: `[B, T, S_h]` for the
    head's whole query group, or `[B, G, T, S_h]` per query head."""
    g = q_BxTxHxD.shape[2] // len(self.sizes)
    outs = []
    for h in range(len(self.sizes)):
      rows = self.rows(h)
      outs.append(dot_product_attention(q_BxTxHxD[:, :, h * g:(h + 1) * g], k_BxNxD[:, rows, None],
                                        v_BxNxD[:, rows, None], mask_of(h, rows)))
    return jnp.concatenate(outs, axis=2)

  def decode(self, q_Bx1xHxD: jax.Array, k: Any, v: Any, num_tokens_BxK: jax.Array,
             block: int) -> jax.Array:
    """The kernel for one query per sequence over each head's first `num_tokens` rows (head
    sizes and offsets are whole blocks); k, v: `[B, N, D]` as a storage's `kernel_operand`."""
    first_BxK = jnp.broadcast_to(jnp.asarray(self.offsets[:-1] // block), num_tokens_BxK.shape)
    tables_BxKxM = range_tables(first_BxK, max(self.sizes) // block)
    return block_sparse_decode(q_Bx1xHxD[:, 0], k, v, tables_BxKxM, num_tokens_BxK,
                               block_size=block)[:, None]
