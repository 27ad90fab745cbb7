"""Decode attention where each (sequence, KV head) reads only its own list of K/V blocks.

Layout (the contract with the caches that use it):
- `k`, `v`: `[B, N, D]`, one flat row buffer per sequence that the KV heads share by
  disjoint row ranges, or `[B, N, K, D]`, a dense per-head cache read sparsely.
- `block_tables[b, h, j]`: index of the j-th block (rows `[t*block_size, (t+1)*block_size)`
  for entry t) of KV head h in sequence b. `M`, the table width, is the largest count any head
  may need; entries past a head's count are never read (any value will do).
- `num_tokens[b, h]`: valid keys of that head, counted along the table order; only the first
  `cdiv(num_tokens, block_size)` blocks are read, so time scales with the density.
Query heads `h*G .. h*G+G-1` read KV head h. Softmax does not care about key order (RoPE is
already in the keys), so a ring buffer needs no unrolling.

The caches this serves keep their K/V in one flat buffer whose heads own row ranges
(`kvjax.cache.flat.FlatHeads`): head h owns rows `[offset_h, offset_h + size_h)` of
`[B, sum_h size_h, D]`, sizes and offsets in whole blocks, and its visible rows are a prefix of
its range. Table row: `offset_h / block_size + arange(M)` (`range_tables`).
- MoA (`kvjax.moa.layout`): per head a sink block, then a ring buffer; `num_tokens =
  min(tokens written, size_h)`.
- Compacted survivors of eviction or an attention gate (`kvjax.cache.compact`): `num_tokens` =
  the rows visible to the query (kept tokens, then the query's own).
On TPU the tables are scalar-prefetched into SMEM: keep `B*K*M` int32s well under its size;
`eligibility(platform, "flat" or "dense_blocks", ...)` says where the kernel applies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.pallas_kernels.blocked_decode import blocked_decode
from kvjax.pallas_kernels.eligibility import TABLE_BLOCK
from kvjax.pallas_kernels.quantized import QuantizedKV, kv_map


def range_tables(first_block_BxK: jax.Array, max_blocks: int) -> jax.Array:
  """Tables for heads whose blocks are one contiguous run starting at `first_block`."""
  return first_block_BxK[..., None] + jnp.arange(max_blocks, dtype=jnp.int32)


def flat_rows(x: jax.Array | QuantizedKV) -> jax.Array | QuantizedKV:
  """`[B, N, D]` or `[B, N, K, D]` -> the `[B, N, W]` view the kernels read (no copy)."""
  return x if len(x.shape) == 3 else kv_map(lambda a: a.reshape(*a.shape[:2], -1), x)


def block_sparse_decode(q_BxHxD: jax.Array, k: jax.Array | QuantizedKV,
                        v: jax.Array | QuantizedKV,
                        block_tables_BxKxM: jax.Array, num_tokens_BxK: jax.Array, *,
                        block_size: int = TABLE_BLOCK, num_splits: int | None = None,
                        backend: str | None = None, interpret=None) -> jax.Array:
  """One query per sequence over each KV head's listed blocks; returns `[B, H, D]`.

  k, v: values, or `QuantizedKV` codes and scales that the kernel dequantizes into q's dtype.
  Keyword options as in `blocked_decode`.
  """
  if len(k.shape) not in (3, 4):
    raise ValueError(f"k/v must be [B, N, D] or [B, N, K, D], got shape {k.shape}")
  if block_tables_BxKxM.shape[:2] != num_tokens_BxK.shape:
    raise ValueError(f"block_tables {block_tables_BxKxM.shape} and num_tokens "
                     f"{num_tokens_BxK.shape} must agree on [B, K]")
  capacity = block_tables_BxKxM.shape[2] * block_size
  leading = functools.partial(kv_map, lambda a: a[None])
  return blocked_decode(q_BxHxD, leading(flat_rows(k)), leading(flat_rows(v)), 0,
                        jnp.minimum(num_tokens_BxK, capacity), block_tables_BxKxM,
                        layout="flat" if len(k.shape) == 3 else "dense_blocks",
                        block_size=block_size,
                        num_splits=num_splits, backend=backend, interpret=interpret)
