"""Triton (Pallas GPU) program for blocked decode attention: one program per (sequence, KV head,
split) loops over its blocks, loading each K/V block once for all query heads of the group.

Triton wants every array a power of two: head dims are padded to one (24 -> 32, 80 -> 128) by
masked loads of the real columns, so the cache is never copied. Loads are masked to the valid
tokens, so rows past a head's count are neither read nor trusted. The K/V refs are whole
`[L, B, N, C]` buffers (L > 1: a scanned stack, read at `layer` in place); Pallas switches to
64-bit offsets for buffers over 4 GiB.

float32 caches with groups of fewer than 16 query heads use broadcast multiply + reduce for
their products: a Triton dot needs >= 16 rows, and a HIGHEST-precision float32 dot runs as IEEE
FMAs, so padding a 1-8 row group to 16 would do up to 16x redundant work for the same exact
result. (bf16x3 on tensor cores would be cheaper per row but less exact than the float32
reference; at these groups the kernel is bound by memory, not FMAs.) Half-precision caches keep
tensor-core dots, where the padded rows are free.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kvjax.pallas_kernels.split_k import (combine_splits, init_partial, num_blocks_of,
                                          online_softmax_step, split_range)

MIN_DOT_DIM = 16  # Triton dots need every dimension >= 16


def pow2_at_least(n: int, floor: int = 1) -> int:
  return max(floor, 1 << (n - 1).bit_length())


def uses_fma(group: int, dtype) -> bool:
  """float32 groups that a dot would pad to 16 rows take the broadcast-multiply path."""
  return jnp.dtype(dtype) == jnp.float32 and pow2_at_least(group) < MIN_DOT_DIM


def gpu_num_splits(batch: int, num_kv_heads: int, max_blocks: int, target_programs: int = 512,
                   min_blocks_per_split: int = 4) -> int:
  """Splits per (sequence, KV head): enough programs to fill a GPU, few enough partials."""
  want = -(-target_programs // (batch * num_kv_heads))
  return max(1, min(want, -(-max_blocks // min_blocks_per_split)))


def _kernel(layer_ref, num_tokens_ref, *refs, block_size: int, num_splits: int, head_dim: int,
            row_groups: int, per_head_columns: bool, has_table: bool, fma: bool, scale: float):
  table_ref, (q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref) = (
      (refs[0], refs[1:]) if has_table else (None, refs))
  b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  num_tokens = num_tokens_ref[b, h]
  start, stop = split_range(num_blocks_of(num_tokens, block_size), split, num_splits)
  layer = layer_ref[0]
  rows, dp = q_ref.shape
  cols = pl.ds(h * head_dim if per_head_columns else 0, dp)
  real_cols_1xDp = None if dp == head_dim else (jnp.arange(dp) < head_dim)[None, :]
  slots_S = jnp.arange(block_size, dtype=jnp.int32)

  def load(ref, i):
    row = (i if table_ref is None else table_ref[b, h, i]) * block_size
    mask_SxDp = (i * block_size + slots_S < num_tokens)[:, None]
    if real_cols_1xDp is not None:
      mask_SxDp = mask_SxDp & real_cols_1xDp
    return plgpu.load(ref.at[layer, b, pl.ds(row, block_size), cols], mask=mask_SxDp, other=0)

  per = rows // row_groups
  qs = [q_ref[pl.ds(r * per, per), :] for r in range(row_groups)]

  def body(i, carry):
    k_SxDp, v_SxDp = load(k_ref, i), load(v_ref, i)
    return tuple(online_softmax_step(q, k_SxDp, v_SxDp, i * block_size, num_tokens, *part,
                                     scale=scale, fma=fma) for q, part in zip(qs, carry))

  parts = jax.lax.fori_loop(start, stop, body, tuple(init_partial(per, dp) for _ in qs))
  for r, (m, l, acc) in enumerate(parts):
    acc_ref[pl.ds(r * per, per), :] = acc
    m_ref[pl.ds(r * per, per), :] = m
    l_ref[pl.ds(r * per, per), :] = l


def decode_gpu(q_BxKxGxD, k_LxBxNxW, v_LxBxNxW, layer_1, num_tokens_BxK, table_BxKxM, *,
               block_size: int, num_splits: int | None, interpret, num_warps: int = 4,
               num_stages: int = 2) -> jax.Array:
  """Normalised float32 `[B, K, G, D]`; see `blocked_decode` for the layout."""
  b, k, g, d = q_BxKxGxD.shape
  max_blocks = (-(-k_LxBxNxW.shape[2] // block_size) if table_BxKxM is None
                else table_BxKxM.shape[2])
  num_splits = num_splits or gpu_num_splits(b, k, max_blocks)
  fma = uses_fma(g, k_LxBxNxW.dtype)
  rows, dp = (g, pow2_at_least(d)) if fma else (pow2_at_least(g, MIN_DOT_DIM),
                                                pow2_at_least(d, MIN_DOT_DIM))
  q_BxKxRxDp = jnp.pad(q_BxKxGxD, ((0, 0), (0, 0), (0, rows - g), (0, dp - d)))
  tables = () if table_BxKxM is None else (table_BxKxM,)
  kernel = functools.partial(
      _kernel, block_size=block_size, num_splits=num_splits, head_dim=d,
      row_groups=rows if fma else 1, per_head_columns=k_LxBxNxW.shape[3] != d,
      has_table=bool(tables), fma=fma, scale=d ** -0.5)
  part_spec = lambda last: pl.BlockSpec((None, None, None, rows, last),
                                        lambda i, h, s: (i, h, s, 0, 0))
  part_shape = lambda last: jax.ShapeDtypeStruct((b, k, num_splits, rows, last), jnp.float32)
  acc, m, l = pl.pallas_call(
      kernel,
      grid=(b, k, num_splits),
      in_specs=[pl.no_block_spec] * (2 + len(tables)) + [
          pl.BlockSpec((None, None, rows, dp), lambda i, h, s: (i, h, 0, 0)),
          pl.no_block_spec, pl.no_block_spec],
      out_specs=[part_spec(dp), part_spec(1), part_spec(1)],
      out_shape=[part_shape(dp), part_shape(1), part_shape(1)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="blocked_decode",
  )(layer_1, num_tokens_BxK, *tables, q_BxKxRxDp, k_LxBxNxW, v_LxBxNxW)
  return combine_splits(acc, m, l)[:, :, :g, :d]
