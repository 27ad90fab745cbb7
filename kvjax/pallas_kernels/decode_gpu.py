"""Triton (Pallas GPU) program for blocked decode attention: one program per (sequence, KV head,
split) loops over its blocks, loading each K/V block once for all query heads of the group.

Loads are masked to the valid tokens, so rows past a sequence's end are neither read nor trusted.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kvjax.pallas_kernels.split_k import (init_partial, num_blocks_of, online_softmax_step,
                                          split_range)


def _kernel(num_tokens_ref, *refs, block_size: int, num_splits: int, scale: float,
            has_table: bool):
  table_ref, (q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref) = (
      (refs[0], refs[1:]) if has_table else (None, refs))
  b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  num_tokens = num_tokens_ref[b, h]
  start, stop = split_range(num_blocks_of(num_tokens, block_size), split, num_splits)
  q_GxD = q_ref[...]
  rows_S = jnp.arange(block_size, dtype=jnp.int32)

  def body(i, carry):
    row = (i if table_ref is None else table_ref[b, h, i]) * block_size
    valid_Sx1 = (i * block_size + rows_S < num_tokens)[:, None]
    k_SxD = plgpu.load(k_ref.at[pl.ds(row, block_size), :], mask=valid_Sx1, other=0)
    v_SxD = plgpu.load(v_ref.at[pl.ds(row, block_size), :], mask=valid_Sx1, other=0)
    return online_softmax_step(q_GxD, k_SxD, v_SxD, i * block_size, num_tokens, *carry,
                               scale=scale)

  m_Gx1, l_Gx1, acc_GxD = jax.lax.fori_loop(start, stop, body, init_partial(*q_GxD.shape))
  acc_ref[...] = acc_GxD
  m_ref[...] = m_Gx1
  l_ref[...] = l_Gx1


def decode_partials_gpu(q_BxKxGxD, k_BxNxCD, v_BxNxCD, num_tokens_BxK, table_BxKxM, *,
                        block_size: int, num_splits: int, num_warps: int = 4, num_stages: int = 2,
                        interpret: bool = False):
  """Per-split partials `(acc, m, l)`; see `blocked_decode` for the layout."""
  b, k, g, d = q_BxKxGxD.shape
  n = k_BxNxCD.shape[1]
  col = (lambda h: h) if k_BxNxCD.shape[2] == k * d else (lambda h: 0)
  kv_spec = pl.BlockSpec((None, n, d), lambda i, h, s: (i, 0, col(h)))
  part_spec = lambda last: pl.BlockSpec((None, None, None, g, last),
                                        lambda i, h, s: (i, h, s, 0, 0))
  part_shape = lambda last: jax.ShapeDtypeStruct((b, k, num_splits, g, last), jnp.float32)
  tables = () if table_BxKxM is None else (table_BxKxM,)
  kernel = functools.partial(_kernel, block_size=block_size, num_splits=num_splits,
                             scale=d ** -0.5, has_table=bool(tables))
  return pl.pallas_call(
      kernel,
      grid=(b, k, num_splits),
      in_specs=[pl.no_block_spec] * (1 + len(tables)) + [
          pl.BlockSpec((None, None, g, d), lambda i, h, s: (i, h, 0, 0)), kv_spec, kv_spec],
      out_specs=[part_spec(d), part_spec(1), part_spec(1)],
      out_shape=[part_shape(d), part_shape(1), part_shape(1)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="blocked_decode",
  )(num_tokens_BxK, *tables, q_BxKxGxD, k_BxNxCD, v_BxNxCD)
