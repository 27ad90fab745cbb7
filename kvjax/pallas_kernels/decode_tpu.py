"""Mosaic (Pallas TPU) program for blocked decode attention.

Token counts and block tables are scalar-prefetched into SMEM so the K/V index maps can pick each
step's block before the kernel body runs; the grid's last axis walks a split's blocks and the
pipeline double-buffers the DMAs. Steps past a split's last block map to that same block, and the
pipeline skips a copy whose block index did not change, so unlisted blocks are never read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kvjax.pallas_kernels.split_k import (init_partial, num_blocks_of, online_softmax_step,
                                          split_range)


def _block_pos(b, h, split, step, num_tokens_ref, *, block_size: int, num_splits: int):
  """This step's list position, clamped into the split's active range (or its last block)."""
  n = num_blocks_of(num_tokens_ref[b, h], block_size)
  start, stop = split_range(n, split, num_splits)
  last = jnp.maximum(jnp.minimum(stop, n) - 1, 0)
  return jnp.minimum(start + step, last), start + step < stop


def _kernel(num_tokens_ref, *refs, block_size: int, num_splits: int, scale: float,
            has_table: bool):
  q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, acc_sc, m_sc, l_sc = refs[has_table:]
  b, h, split, step = (pl.program_id(i) for i in range(4))
  pos, active = _block_pos(b, h, split, step, num_tokens_ref, block_size=block_size,
                           num_splits=num_splits)

  @pl.when(step == 0)
  def _():
    m_sc[...], l_sc[...], acc_sc[...] = init_partial(*acc_sc.shape)

  @pl.when(active)
  def _():
    m_sc[...], l_sc[...], acc_sc[...] = online_softmax_step(
        q_ref[...], k_ref[...], v_ref[...], pos * block_size, num_tokens_ref[b, h], m_sc[...],
        l_sc[...], acc_sc[...], scale=scale)

  @pl.when(step == pl.num_programs(3) - 1)
  def _():
    acc_ref[...], m_ref[...], l_ref[...] = acc_sc[...], m_sc[...], l_sc[...]


def decode_partials_tpu(q_BxKxGxD, k_BxNxCD, v_BxNxCD, num_tokens_BxK, table_BxKxM, *,
                        block_size: int, num_splits: int, interpret: bool = False):
  """Per-split partials `(acc, m, l)`; see `blocked_decode` for the layout."""
  b, k, g, d = q_BxKxGxD.shape
  n = k_BxNxCD.shape[1]
  max_blocks = -(-n // block_size) if table_BxKxM is None else table_BxKxM.shape[2]
  steps = -(-max_blocks // num_splits)
  col = (lambda h: h) if k_BxNxCD.shape[2] == k * d else (lambda h: 0)
  pos_of = functools.partial(_block_pos, block_size=block_size, num_splits=num_splits)

  def kv_index(i, h, s, j, num_tokens_ref, *table_ref):
    pos, _ = pos_of(i, h, s, j, num_tokens_ref)
    return i, table_ref[0][i, h, pos] if table_ref else pos, col(h)

  tables = () if table_BxKxM is None else (table_BxKxM,)
  kv_spec = pl.BlockSpec((None, block_size, d), kv_index)
  part_spec = lambda last: pl.BlockSpec((None, None, None, g, last),
                                        lambda i, h, s, j, *_: (i, h, s, 0, 0))
  part_shape = lambda last: jax.ShapeDtypeStruct((b, k, num_splits, g, last), jnp.float32)
  kernel = functools.partial(_kernel, block_size=block_size, num_splits=num_splits,
                             scale=d ** -0.5, has_table=bool(tables))
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1 + len(tables),
          grid=(b, k, num_splits, steps),
          in_specs=[pl.BlockSpec((None, None, g, d), lambda i, h, s, j, *_: (i, h, 0, 0)),
                    kv_spec, kv_spec],
          out_specs=[part_spec(d), part_spec(1), part_spec(1)],
          scratch_shapes=[pltpu.VMEM((g, d), jnp.float32), pltpu.VMEM((g, 1), jnp.float32),
                          pltpu.VMEM((g, 1), jnp.float32)]),
      out_shape=[part_shape(d), part_shape(1), part_shape(1)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="blocked_decode",
  )(num_tokens_BxK, *tables, q_BxKxGxD, k_BxNxCD, v_BxNxCD)
