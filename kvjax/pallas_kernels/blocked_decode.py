"""Layout-agnostic decode attention over lists of K/V blocks; both public kernels call this.

K/V buffers are `[B, N, C*D]`: N rows (token slots) per sequence, C column groups of D lanes.
Either C == K, one column group per KV head (a dense `[B, S, K, D]` cache viewed without a
copy), or C == 1, one flat row buffer whose rows the heads share by disjoint row ranges.
The keys of (sequence b, KV head h) are the rows of blocks `table[b, h, 0], table[b, h, 1], ...`
(block j = rows `[j*block_size, (j+1)*block_size)`; no table means block j is the j-th block of
rows), taken in that order, of which the first `num_tokens[b, h]` are valid. Blocks past
`cdiv(num_tokens[b, h], block_size)` are never read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.pallas_kernels.decode_gpu import decode_partials_gpu
from kvjax.pallas_kernels.decode_tpu import decode_partials_tpu
from kvjax.pallas_kernels.split_k import combine_splits, default_num_splits, group_queries

BACKENDS = ("triton", "mosaic_tpu")


def default_backend() -> str:
  """Mosaic on TPU, Triton elsewhere (on CPU the Triton program runs in interpret mode)."""
  return "mosaic_tpu" if jax.default_backend() == "tpu" else "triton"


def check_block_size(block_size: int) -> None:
  if block_size < 16 or block_size & (block_size - 1):
    raise ValueError(f"block_size must be a power of two >= 16 (Triton's shape rules), "
                     f"got {block_size}")


@functools.partial(jax.jit, static_argnames=("block_size", "num_splits", "backend", "interpret"))
def blocked_decode(q_BxHxD: jax.Array, k_BxNxCD: jax.Array, v_BxNxCD: jax.Array,
                   num_tokens_BxK: jax.Array, table_BxKxM: jax.Array | None, *, block_size: int,
                   num_splits: int | None = None, backend: str | None = None,
                   interpret: bool | None = None) -> jax.Array:
  """One query token per sequence against each KV head's block list; returns `[B, H, D]`.

  num_splits: splits of each (sequence, KV head)'s block list, combined by log-sum-exp
    (default: enough programs to fill a GPU).
  backend: `triton` | `mosaic_tpu` (default: the one for the default device).
  interpret: run the Pallas interpreter (default: on a CPU backend).
  """
  b, h, d = q_BxHxD.shape
  k = num_tokens_BxK.shape[1]
  check_block_size(block_size)
  if k_BxNxCD.shape != v_BxNxCD.shape or k_BxNxCD.shape[2] not in (d, k * d):
    raise ValueError(f"K/V buffers must share a [B, N, K*D] or [B, N, D] shape with D={d}, K={k}; "
                     f"got {k_BxNxCD.shape} and {v_BxNxCD.shape}")
  backend = backend or default_backend()
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  max_blocks = -(-k_BxNxCD.shape[1] // block_size) if table_BxKxM is None else table_BxKxM.shape[2]
  num_splits = num_splits or default_num_splits(b, k, max_blocks)
  partials = (decode_partials_gpu if backend == "triton" else decode_partials_tpu)
  q_BxKxGxD = group_queries(q_BxHxD, k).astype(k_BxNxCD.dtype)  # one dtype per dot
  acc, m, l = partials(q_BxKxGxD, k_BxNxCD, v_BxNxCD,
                       num_tokens_BxK.astype(jnp.int32),
                       None if table_BxKxM is None else table_BxKxM.astype(jnp.int32),
                       block_size=block_size, num_splits=num_splits, interpret=interpret)
  return combine_splits(acc, m, l, h // k, q_BxHxD.dtype)
