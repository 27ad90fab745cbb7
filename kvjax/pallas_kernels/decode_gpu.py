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

Quantized K/V: each block's codes and scales are loaded together (masked alike) and dequantized
in registers into the query's dtype; int4's two nibble halves are two column parts, each padded
like a head and met by its half of the query, so the output comes back as two halves.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kvjax.pallas_kernels.quantized import (QuantizedKV, code_parts, dequantize_tile,
                                            scale_index)
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
            groups: int, group: int, mode: str | None, row_groups: int, per_head_columns: bool,
            has_table: bool, fma: bool, scale: float):
  """head_dim: code columns of a head (D, or D/2 for int4); groups: its scale columns (0 for a
  float cache), each for `group` values."""
  table_ref, refs = (refs[0], refs[1:]) if has_table else (None, refs)
  q_ref, kv_refs, (acc_ref, m_ref, l_ref) = refs[0], refs[1:-3], refs[-3:]
  k_refs, v_refs = kv_refs[:len(kv_refs) // 2], kv_refs[len(kv_refs) // 2:]
  b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  num_tokens = num_tokens_ref[b, h]
  start, stop = split_range(num_blocks_of(num_tokens, block_size), split, num_splits)
  layer = layer_ref[0]
  rows, width = q_ref.shape
  parts = 2 if mode == "int4" else 1
  dp = width // parts
  slots_S = jnp.arange(block_size, dtype=jnp.int32)

  def load(ref, i, real: int, padded: int):
    """Block i's `[block_size, padded]` columns of this head, zero past its `real` columns and
    past the valid tokens."""
    row = (i if table_ref is None else table_ref[b, h, i]) * block_size
    cols = pl.ds(h * real if per_head_columns else 0, padded)
    mask_SxW = (i * block_size + slots_S < num_tokens)[:, None]
    if padded != real:
      mask_SxW = mask_SxW & (jnp.arange(padded) < real)[None, :]
    return plgpu.load(ref.at[layer, b, pl.ds(row, block_size), cols], mask=mask_SxW,
                      other=jnp.zeros((), ref.dtype))  # typed: Triton casts no int to fp8

  index = [scale_index(dp, head_dim, p, group, groups) for p in range(parts)] if mode else None

  def read(refs, i):
    """Block i of K or V as its column parts, dequantized from codes and scales."""
    if mode is None:
      return (load(refs[0], i, head_dim, dp),)
    codes_ref, scales_ref = refs
    scales = load(scales_ref, i, groups, pow2_at_least(groups))
    return tuple(dequantize_tile(c_SxW, scales, index[p], q_ref.dtype, by_dot=False)
                 for p, c_SxW in enumerate(code_parts(load(codes_ref, i, head_dim, dp), mode)))

  per = rows // row_groups
  column_parts = [pl.ds(p * dp, dp) for p in range(parts)]
  qs = [tuple(q_ref[pl.ds(r * per, per), c] for c in column_parts) for r in range(row_groups)]

  def body(i, carry):
    k_parts, v_parts = read(k_refs, i), read(v_refs, i)
    return tuple(online_softmax_step(q, k_parts, v_parts, i * block_size, num_tokens, *part,
                                     scale=scale, fma=fma) for q, part in zip(qs, carry))

  parts_init = tuple(init_partial(per, dp, parts) for _ in qs)
  results = jax.lax.fori_loop(start, stop, body, parts_init)
  for r, (m, l, accs) in enumerate(results):
    for c, acc in zip(column_parts, accs):
      acc_ref[pl.ds(r * per, per), c] = acc
    m_ref[pl.ds(r * per, per), :] = m
    l_ref[pl.ds(r * per, per), :] = l


def decode_gpu(q_BxKxGxD, k, v, layer_1, num_tokens_BxK, table_BxKxM, *, block_size: int,
               num_splits: int | None, interpret, num_warps: int = 4,
               num_stages: int = 2) -> jax.Array:
  """Normalised float32 `[B, K, G, D]`; see `blocked_decode` for the layout. K/V are
  `[L, B, N, W]` values in q's dtype or `QuantizedKV` (dequantized into q's dtype)."""
  b, kh, g, d = q_BxKxGxD.shape
  quant = isinstance(k, QuantizedKV)
  operands = (k.codes, k.scales, v.codes, v.scales) if quant else (k, v)
  n, columns = operands[0].shape[2:]
  parts = k.parts if quant else 1
  dc = d // parts
  per_head_columns = columns != dc
  groups = operands[1].shape[3] // (kh if per_head_columns else 1) if quant else 0
  max_blocks = -(-n // block_size) if table_BxKxM is None else table_BxKxM.shape[2]
  num_splits = num_splits or gpu_num_splits(b, kh, max_blocks)
  fma = uses_fma(g, q_BxKxGxD.dtype)
  rows, dp = (g, pow2_at_least(dc)) if fma else (pow2_at_least(g, MIN_DOT_DIM),
                                                 pow2_at_least(dc, MIN_DOT_DIM))
  q_BxKxRxW = jnp.pad(q_BxKxGxD.reshape(b, kh, g, parts, dc),  # each part padded to dp
                      ((0, 0), (0, 0), (0, rows - g), (0, 0), (0, dp - dc))).reshape(
                          b, kh, rows, parts * dp)
  tables = () if table_BxKxM is None else (table_BxKxM,)
  kernel = functools.partial(
      _kernel, block_size=block_size, num_splits=num_splits, head_dim=dc, groups=groups,
      group=d // groups if quant else 0, mode=k.mode if quant else None,
      row_groups=rows if fma else 1, per_head_columns=per_head_columns, has_table=bool(tables),
      fma=fma, scale=d ** -0.5)
  part_spec = lambda last: pl.BlockSpec((None, None, None, rows, last),
                                        lambda i, h, s: (i, h, s, 0, 0))
  part_shape = lambda last: jax.ShapeDtypeStruct((b, kh, num_splits, rows, last), jnp.float32)
  width = parts * dp
  acc, m, l = pl.pallas_call(
      kernel,
      grid=(b, kh, num_splits),
      in_specs=[pl.no_block_spec] * (2 + len(tables)) + [
          pl.BlockSpec((None, None, rows, width), lambda i, h, s: (i, h, 0, 0)),
          *[pl.no_block_spec] * len(operands)],
      out_specs=[part_spec(width), part_spec(1), part_spec(1)],
      out_shape=[part_shape(width), part_shape(1), part_shape(1)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="blocked_decode",
  )(layer_1, num_tokens_BxK, *tables, q_BxKxRxW, *operands)
  out_BxKxGxW = combine_splits(acc, m, l)[:, :, :g]
  return out_BxKxGxW.reshape(b, kh, g, parts, dp)[..., :dc].reshape(b, kh, g, d)
