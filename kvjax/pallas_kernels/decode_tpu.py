"""Mosaic (Pallas TPU) program for blocked decode attention.

Tiling, for any head_dim and KV head count under Mosaic's (8, 128) rule:
- One program per (sequence, head tile, split). A head tile is the fewest KV heads whose
  columns span a multiple of 128 lanes, or all KV heads of a row (`heads_per_tile`): blocks
  are `[rows, tile width]` windows that are either lane-aligned or the buffer's full width, so
  a `[B, S, K*D]` cache with D = 64 and K = 3 is read as whole 192-lane rows, not as unaligned
  64-lane slices. A flat `[B, N, D]` buffer (heads own rows) has one head per tile.
- The query heads of a tile form a block-diagonal `[tile heads x G, tile width]` matrix, so one
  MXU product scores every head of the tile against its own columns (at most `heads_per_tile`
  times the useful MXU work, which a memory-bound decode does not notice); the wrapper keeps the
  diagonal blocks of the result.
- The sequence loop runs inside the kernel over chunks of several blocks; each chunk's blocks
  are DMA'd from HBM (`memory_space=ANY`) into a double buffer while the previous chunk is
  computed, as jax's TPU paged attention does. The loop stops at the head's own length: blocks
  past it are neither copied nor computed, and a head with no tokens issues no DMA at all.
- Token counts, block tables and the stack index are scalar-prefetched into SMEM (flattened to
  1-D, which SMEM stores without padding).
- DMA windows start on row-tile boundaries; the last partial block of a dense buffer is copied
  rounded up to Mosaic's row tiling (the padding every tiled HBM array has), as the Pallas
  pipeline does for edge blocks.
- Splits of the sequence only help to occupy a second TensorCore (megacore), so a program
  normally walks its whole sequence.
- Quantized K/V: codes and scales are DMA'd side by side, each into its own double buffer, and
  dequantized in float32 per chunk (codes widened to int32, int4 nibbles split by shifts, a
  chunk capped so one dequantized part fits `DEQUANT_TILE_BYTES`). A tile's columns must be
  lane-aligned in both buffers, so a dense cache with one scale per head is read as whole rows;
  a partial last block is rounded up to 32 rows, the row tile of 1-byte codes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kvjax.pallas_kernels.quantized import (QuantizedKV, code_parts, dequantize_tile,
                                            scale_index)
from kvjax.pallas_kernels.split_k import (combine_splits, init_partial, num_blocks_of,
                                          online_softmax_step, split_range)

LANES = 128
DENSE_BLOCK_ROWS = 512  # rows per DMA in a dense buffer (large copies; the tail is rounded up)
MAX_CHUNK_ROWS = 1024  # rows per chunk: per-step overhead amortised over >= 0.25 MiB of K/V
KV_VMEM_BUDGET = 8 * 2**20  # bytes for the K and V double buffers
DEQUANT_TILE_BYTES = 2**20  # a chunk of dequantized float32 values (one part of K or V)


def heads_per_tile(num_kv_heads: int, *head_widths: int) -> int:
  """KV heads one program reads from a `[.., K*D]` row (and from each other buffer whose heads
  are `head_widths` columns wide: codes, scales): the fewest whose widths are all multiples of
  128 lanes, or all of them (the full rows, which Mosaic accepts at any width)."""
  return next((n for n in range(1, num_kv_heads + 1) if num_kv_heads % n == 0
               and all(n * w % LANES == 0 for w in head_widths)), num_kv_heads)


def row_tile(rows: int, dtype) -> int:
  """Mosaic's second-minor tiling of an array with `rows` rows (its `getTilingFactor`):
  DMA windows start and end on multiples of it."""
  tile = 4 // jnp.dtype(dtype).itemsize
  while tile < min(rows, 8):
    tile *= 2
  return tile


def sublane_rows(dtype) -> int:
  """Rows of one vreg for `dtype` (8 for 32-bit, 16 for 16-bit)."""
  return 8 * (4 // jnp.dtype(dtype).itemsize)


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def tpu_interpret_params() -> pltpu.InterpretParams:
  """TPU interpret mode where reading a tile's padding past an array's end returns NaN (the
  kernel must mask it) instead of failing as out of bounds."""
  return pltpu.InterpretParams(out_of_bounds_reads="uninitialized")


def tpu_num_splits(batch: int, num_tiles: int, max_blocks: int) -> int:
  """One split per program, or two when a single program would leave a megacore's second
  TensorCore idle (the grid runs in sequence on one core otherwise)."""
  return 2 if batch * num_tiles == 1 and max_blocks > 1 else 1


def block_diagonal(q_BxKxGxD: jax.Array, per_tile: int, rows: int) -> jax.Array:
  """`[B, K/t, rows, t*D]`: each tile's query heads on the diagonal (zero rows padded)."""
  b, k, g, d = q_BxKxGxD.shape
  q_BxXxYxGx1xD = q_BxKxGxD.reshape(b, k // per_tile, per_tile, g, 1, d)
  eye_YxGxYx1 = jnp.eye(per_tile, dtype=bool)[:, None, :, None]
  q_bd = jnp.where(eye_YxGxYx1, q_BxXxYxGx1xD, 0).reshape(b, k // per_tile, per_tile * g,
                                                          per_tile * d)
  return jnp.pad(q_bd, ((0, 0), (0, 0), (0, rows - per_tile * g), (0, 0)))


def diagonal_blocks(out_BxXxQxW: jax.Array, per_tile: int, group: int) -> jax.Array:
  """Inverse of `block_diagonal` on the result: `[B, K, G, D]`."""
  b, t, _, w = out_BxXxQxW.shape
  d = w // per_tile
  blocks = out_BxXxQxW[:, :, :per_tile * group].reshape(b, t, per_tile, group, per_tile, d)
  out_BxXxGxDxY = jnp.diagonal(blocks, axis1=2, axis2=4)
  return jnp.moveaxis(out_BxXxGxDxY, -1, 2).reshape(b, t * per_tile, group, d)


def _kernel(layer_ref, num_tokens_ref, *refs, block_size: int, blocks_per_chunk: int,
            num_splits: int, num_blocks_total: int, tail_rows: int, table_width: int,
            tiled_columns: tuple[bool, ...], mode: str | None, head_dim: int, group: int,
            groups: int, scale: float):
  """The HBM operands are K then V, each its values or its codes and scales; head_dim: code
  columns of a head (D, or D/2 for int4); groups: its scale columns, each for `group` values."""
  table_ref = refs[0] if table_width else None
  refs = refs[bool(table_width):]
  n = len(tiled_columns)
  q_ref, hbms, (acc_ref, m_ref, l_ref) = refs[0], refs[1:1 + n], refs[1 + n:4 + n]
  bufs, sems = refs[4 + n:4 + 2 * n], refs[4 + 2 * n:]
  b, t, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bt = b * pl.num_programs(1) + t
  num_tokens = num_tokens_ref[bt]
  start, stop = split_range(num_blocks_of(num_tokens, block_size), split, num_splits)
  end = jnp.minimum(num_tokens, stop * block_size)  # the next split's rows are not copied
  bps = blocks_per_chunk
  num_chunks = jax.lax.div(stop - start + bps - 1, bps)
  layer = layer_ref[0]
  cols = [pl.ds(pl.multiple_of(t * buf.shape[-1], LANES) if tiled else 0, buf.shape[-1])
          for buf, tiled in zip(bufs, tiled_columns)]
  last = num_blocks_total - 1
  sizes = ([(block_size, None)] if tail_rows == block_size else
           [(block_size, lambda j: j != last), (tail_rows, lambda j: j == last)])

  def chunk_copies(chunk, slot, action: str):
    """Starts or waits for the DMAs of a chunk's blocks that exist (same guards both times)."""
    for i in range(bps):
      j = start + chunk * bps + i
      for rows, is_this_size in sizes:
        cond = j < stop if is_this_size is None else (j < stop) & is_this_size(j)

        @pl.when(cond)
        def _(i=i, j=j, rows=rows):
          block = table_ref[bt * table_width + j] if table_ref is not None else j
          first = pl.multiple_of(block * block_size, block_size & -block_size)
          for hbm, buf, sem, col in zip(hbms, bufs, sems, cols):
            copy = pltpu.make_async_copy(hbm.at[layer, b, pl.ds(first, rows), col],
                                         buf.at[slot, i, pl.ds(0, rows)], sem.at[slot])
            getattr(copy, action)()

  @pl.when(num_chunks > 0)
  def _():
    chunk_copies(0, 0, "start")

  parts = acc_ref.shape[0]
  qs = tuple(q_ref[p] for p in range(parts))
  width = bufs[0].shape[-1]
  index = [scale_index(width, head_dim, p, group, groups) for p in range(parts)] if mode else None

  def read(tiles):
    """A chunk of K or V as its column parts, dequantized from codes and scales."""
    if mode is None:
      return tiles
    codes_SxW, scales = tiles
    return tuple(dequantize_tile(c_SxW, scales, index[p], q_ref.dtype, by_dot=True)
                 for p, c_SxW in enumerate(code_parts(codes_SxW, mode)))

  def body(c, carry):
    slot = jax.lax.rem(c, 2)

    @pl.when(c + 1 < num_chunks)
    def _():
      chunk_copies(c + 1, 1 - slot, "start")

    chunk_copies(c, slot, "wait")
    tiles = [buf[slot].reshape(bps * block_size, buf.shape[-1]) for buf in bufs]
    return online_softmax_step(qs, read(tiles[:n // 2]), read(tiles[n // 2:]),
                               (start + c * bps) * block_size, end, *carry, scale=scale)

  m, l, accs = jax.lax.fori_loop(0, num_chunks, body, init_partial(*qs[0].shape, parts))
  for p, acc in enumerate(accs):
    acc_ref[p] = acc
  m_ref[...] = m
  l_ref[...] = l


def decode_tpu(q_BxKxGxD, k, v, layer_1, num_tokens_BxK, table_BxKxM, *,
               block_size: int | None, num_splits: int | None, interpret,
               blocks_per_chunk: int | None = None) -> jax.Array:
  """Normalised float32 `[B, K, G, D]`; see `blocked_decode` for the layout. K/V are
  `[L, B, N, C]` values in q's dtype or `QuantizedKV` (dequantized into q's dtype).

  block_size: rows per table entry; for a dense buffer (no table) the DMA block, by default
    up to `DENSE_BLOCK_ROWS`.
  """
  b, kh, g, d = q_BxKxGxD.shape
  dtype = q_BxKxGxD.dtype
  quant = isinstance(k, QuantizedKV)
  operands = (k.codes, k.scales, v.codes, v.scales) if quant else (k, v)
  n, c = operands[0].shape[2:]
  parts = k.parts if quant else 1
  dc = d // parts
  flat = c == dc  # heads own rows, not columns: one head per tile
  head_widths = [x.shape[3] // (1 if flat else kh) for x in operands[:len(operands) // 2]]
  per_tile = 1 if flat else heads_per_tile(kh, *head_widths)
  tiles = kh // per_tile
  widths = [per_tile * w for w in head_widths] * 2
  # DMA windows end on every buffer's row tile; 1-byte codes pack 4 rows a sublane: 32 rows
  tile = max(sublane_rows(x.dtype) if quant else row_tile(n, x.dtype) for x in operands)
  if table_BxKxM is None:
    block_size = block_size or min(DENSE_BLOCK_ROWS, round_up(n, tile))
    max_blocks = -(-n // block_size)
    tail_rows = round_up(n - (max_blocks - 1) * block_size, tile)
  else:
    max_blocks, tail_rows = table_BxKxM.shape[2], block_size
  row_bytes = sum(round_up(w, LANES) * x.dtype.itemsize for w, x in zip(widths, operands))
  chunk_rows = min(MAX_CHUNK_ROWS, KV_VMEM_BUDGET // (2 * row_bytes))
  if quant:  # a chunk's dequantized float32 part and its spread scales live in VMEM
    chunk_rows = min(chunk_rows, DEQUANT_TILE_BYTES // (4 * round_up(widths[0], LANES)))
  bps = blocks_per_chunk or max(1, min(chunk_rows // block_size, max_blocks))
  num_splits = num_splits or tpu_num_splits(b, tiles, max_blocks)
  rows = round_up(per_tile * g, sublane_rows(dtype))
  prefetch = [layer_1, num_tokens_BxK[:, ::per_tile].reshape(-1)]
  if table_BxKxM is not None:
    prefetch.append(table_BxKxM[:, ::per_tile].reshape(-1))
  groups = operands[1].shape[3] // (1 if flat else kh) if quant else 0
  kernel = functools.partial(
      _kernel, block_size=block_size, blocks_per_chunk=bps, num_splits=num_splits,
      num_blocks_total=max_blocks, tail_rows=tail_rows,
      table_width=0 if table_BxKxM is None else table_BxKxM.shape[2],
      tiled_columns=tuple(w != x.shape[3] for w, x in zip(widths, operands)),
      mode=k.mode if quant else None, head_dim=dc, group=d // groups if quant else 0,
      groups=groups, scale=d ** -0.5)
  wc = per_tile * dc
  acc_spec = pl.BlockSpec((None, None, None, parts, rows, wc),
                          lambda i, t, s, *_: (i, t, s, 0, 0, 0))
  part_spec = pl.BlockSpec((None, None, None, rows, 1), lambda i, t, s, *_: (i, t, s, 0, 0))
  part_shape = jax.ShapeDtypeStruct((b, tiles, num_splits, rows, 1), jnp.float32)
  q_parts = jnp.stack([block_diagonal(q, per_tile, rows)
                       for q in jnp.split(q_BxKxGxD, parts, axis=-1)], axis=2)
  acc, m, l = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch),
          grid=(b, tiles, num_splits),
          in_specs=[pl.BlockSpec((None, None, parts, rows, wc),
                                 lambda i, t, s, *_: (i, t, 0, 0, 0)),
                    *[pl.BlockSpec(memory_space=pl.ANY)] * len(operands)],
          out_specs=[acc_spec, part_spec, part_spec],
          scratch_shapes=[*[pltpu.VMEM((2, bps, block_size, w), x.dtype)
                            for w, x in zip(widths, operands)],
                          *[pltpu.SemaphoreType.DMA((2,))] * len(operands)]),
      out_shape=[jax.ShapeDtypeStruct((b, tiles, num_splits, parts, rows, wc), jnp.float32),
                 part_shape, part_shape],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=interpret,
      name="blocked_decode",
  )(*prefetch, q_parts, *operands)
  return jnp.concatenate([diagonal_blocks(combine_splits(acc[:, :, :, p], m, l), per_tile, g)
                          for p in range(parts)], axis=-1)
