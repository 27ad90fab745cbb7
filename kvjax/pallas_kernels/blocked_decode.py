"""Layout-agnostic decode attention over lists of K/V blocks; both public kernels call this.

K/V buffers are `[L, B, N, C]`: L layers of a stack (1 for a single layer's buffers) read at
`layer` in place, N rows (token slots) per sequence, C columns. Either C == K*D, one D-column
group per KV head (a dense `[B, S, K, D]` cache viewed without a copy), or C == D, one flat row
buffer whose rows the heads share by disjoint row ranges.
The keys of (sequence b, KV head h) are the rows of blocks `table[b, h, 0], table[b, h, 1], ...`
(block j = rows `[j*block_size, (j+1)*block_size)`; no table means block j is the j-th block of
rows), taken in that order, of which the first `num_tokens[b, h]` are valid. Blocks past
`cdiv(num_tokens[b, h], block_size)` are never read.
Quantized K/V (`QuantizedKV`) are the same layout of codes with their scales beside them
(`[L, B, N, C/g]`), read block by block with their codes and dequantized into q's dtype; rotated
codes are attended in their basis by a rotated query, whose output is rotated back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.pallas_kernels.decode_gpu import decode_gpu
from kvjax.pallas_kernels.decode_tpu import decode_tpu, tpu_interpret_params
from kvjax.pallas_kernels.eligibility import BACKEND_PLATFORM, eligibility
from kvjax.pallas_kernels.quantized import QuantizedKV, code_format, rotate

NATIVE_BACKEND = {"gpu": "triton", "tpu": "mosaic_tpu"}
DENSE_GPU_BLOCK = 64


def default_backend() -> str:
  """Mosaic on TPU, Triton elsewhere (on CPU the Triton program runs in interpret mode)."""
  return NATIVE_BACKEND.get(jax.default_backend(), "triton")


@functools.partial(jax.jit, static_argnames=("layout", "block_size", "num_splits", "backend",
                                             "interpret", "blocks_per_chunk"))
def blocked_decode(q_BxHxD: jax.Array, k_LxBxNxW: jax.Array | QuantizedKV,
                   v_LxBxNxW: jax.Array | QuantizedKV, layer: jax.Array,
                   num_tokens_BxK: jax.Array, table_BxKxM: jax.Array | None, *, layout: str,
                   block_size: int | None, num_splits: int | None = None,
                   backend: str | None = None, interpret=None,
                   blocks_per_chunk: int | None = None) -> jax.Array:
  """One query token per sequence against each KV head's block list; returns `[B, H, D]`.

  k, v: float values (q is cast to their dtype), or `QuantizedKV` codes and scales (their
    values are computed in q's dtype).
  layout: the cache layout's name in `eligibility` (checked against the backend's rules).
  block_size: rows per block (table entry); None for a dense buffer: 64 rows on GPU, larger
    DMA blocks on TPU.
  num_splits: splits of each (sequence, head)'s blocks, combined by log-sum-exp (default per
    backend: enough programs to fill a GPU; one per program on TPU).
  backend: `triton` | `mosaic_tpu` (default: the one for the default device).
  interpret: run the Pallas interpreter (default: when the device is not the backend's). The
    TPU program runs in TPU interpret mode (simulated DMAs and semaphores); reads of a tile's
    padding past an array's end return NaN there, as uninitialised padding may on a TPU.
  blocks_per_chunk: TPU only, blocks per DMA chunk (default: up to 1024 rows or the VMEM budget).
  """
  b, h, d = q_BxHxD.shape
  k = num_tokens_BxK.shape[1]
  backend = backend or default_backend()
  if backend not in BACKEND_PLATFORM:
    raise ValueError(f"backend must be one of {', '.join(BACKEND_PLATFORM)}, got {backend!r}")
  if (type(k_LxBxNxW) is not type(v_LxBxNxW) or k_LxBxNxW.shape != v_LxBxNxW.shape
      or k_LxBxNxW.shape[3] not in (d, k * d)):
    raise ValueError(f"K/V buffers must share a [.., N, K*D] or [.., N, D] shape with D={d}, "
                     f"K={k}; got {k_LxBxNxW.shape} and {v_LxBxNxW.shape}")
  quant = isinstance(k_LxBxNxW, QuantizedKV)
  if quant:
    check_codes(k_LxBxNxW, v_LxBxNxW, d)
  rotated = quant and k_LxBxNxW.rotated
  dtype = q_BxHxD.dtype if quant else k_LxBxNxW.dtype
  verdict = eligibility(BACKEND_PLATFORM[backend], layout, num_heads=h, num_kv_heads=k,
                        head_dim=d, rows=k_LxBxNxW.shape[2], dtype=dtype, block_size=block_size,
                        **code_format(k_LxBxNxW, d))
  if not verdict.ok:
    raise ValueError(verdict.reason)
  if interpret is None:
    interpret = NATIVE_BACKEND.get(jax.default_backend()) != backend
  if backend == "triton":
    decode = functools.partial(decode_gpu, block_size=block_size or DENSE_GPU_BLOCK,
                               interpret=interpret)
  else:
    decode = functools.partial(decode_tpu, block_size=block_size,
                               blocks_per_chunk=blocks_per_chunk,
                               interpret=tpu_interpret_params() if interpret is True else interpret)
  q_in = rotate(q_BxHxD) if rotated else q_BxHxD
  out_BxKxGxD = decode(q_in.reshape(b, k, h // k, d).astype(dtype),  # one dtype
                       k_LxBxNxW, v_LxBxNxW, jnp.asarray(layer, jnp.int32).reshape(1),
                       num_tokens_BxK.astype(jnp.int32),
                       None if table_BxKxM is None else table_BxKxM.astype(jnp.int32),
                       num_splits=num_splits)
  out_BxHxD = out_BxKxGxD.reshape(b, h, d)
  return (rotate(out_BxHxD) if rotated else out_BxHxD).astype(q_BxHxD.dtype)


def check_codes(k: QuantizedKV, v: QuantizedKV, head_dim: int) -> None:
  """Quantized K and V share a code format, with whole groups of scales per row."""
  per_row = k.shape[3] // head_dim
  groups = k.scales.shape[3] // per_row
  if ((k.mode, k.rotated, k.scales.shape) != (v.mode, v.rotated, v.scales.shape)
      or k.scales.shape[:3] != k.codes.shape[:3] or k.scales.shape[3] % per_row or not groups
      or head_dim % groups):
    raise ValueError(f"quantized K/V must share a code format with scales per row: got "
                     f"{k.mode} codes {k.codes.shape}, scales {k.scales.shape}"
                     f"{' rotated' * k.rotated} and {v.mode} codes {v.codes.shape}, scales "
                     f"{v.scales.shape}{' rotated' * v.rotated}")
