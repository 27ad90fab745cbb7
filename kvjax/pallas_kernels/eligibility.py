"""Whether a decode kernel serves a cache on a platform, and if not, why: the one place that
knows the kernels' limits (the wrappers and `attention_impl=auto` both ask it).

Layouts (what a cache hands the kernels):
- `dense`: `[B, S, K, D]` buffers read up to each sequence's length (GQA, MQA, MHA, CLA's
  shared buffers, Block Transformer and attention-gate caches): `shared_kv_decode`.
- `stacked`: a scanned model's `[G, B, S, K, D]` stack, read at a layer index in place.
- `flat`: `[B, N, D]` rows that the KV heads own by block tables (MoA, Attention-Gate
  compacted survivors): `block_sparse_decode`.
- `dense_blocks`: a `[B, N, K, D]` buffer read through per-head block tables.
Each reads float values, or codes and scales (`quant`: `kvjax.pallas_kernels.quantized`) that
it dequantizes into `dtype` as it loads them.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.pallas_kernels.decode_tpu import LANES
from kvjax.pallas_kernels.quantized import MODES

LAYOUTS = ("dense", "stacked", "flat", "dense_blocks")
BACKEND_PLATFORM = {"triton": "cuda", "mosaic_tpu": "tpu"}
DTYPES = {"cuda": ("float32", "bfloat16", "float16"), "tpu": ("float32", "bfloat16")}
TABLE_BLOCK = 64  # default rows per block-table entry
GPU_MAX_HEAD_DIM = 256  # the Triton kernel's K/V blocks (64 rows x padded D) sit in shared memory
TPU_CODE_ROWS = 32  # rows of one tile of 1-byte codes in TPU memory: DMA windows start on them


@dataclasses.dataclass(frozen=True)
class Eligibility:
  ok: bool
  reason: str = ""  # one line saying why not; empty when ok


def _reason(platform: str, layout: str, num_heads: int, num_kv_heads: int, head_dim: int,
            rows: int, dtype: str, block_size: int | None, quant: str | None,
            group: int) -> str:
  if layout not in LAYOUTS:
    return f"unknown cache layout {layout!r} (known: {', '.join(LAYOUTS)})"
  if platform == "cpu":
    return "no Pallas kernel backend on CPU (the kernels run there only in interpret mode)"
  platform = "cuda" if platform == "gpu" else platform
  if platform not in DTYPES:
    return f"no Pallas decode kernel for platform {platform!r} (kernels: cuda, tpu)"
  if dtype not in DTYPES[platform]:
    return f"cache dtype {dtype} is not supported on {platform} ({', '.join(DTYPES[platform])})"
  if num_heads % num_kv_heads:
    return f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})"
  tables = layout in ("flat", "dense_blocks")
  if tables:
    block_size = block_size or TABLE_BLOCK
  if block_size is not None and (block_size < 16 or block_size & (block_size - 1)):
    return f"block_size must be a power of two >= 16, got {block_size}"
  if platform == "cuda" and head_dim > GPU_MAX_HEAD_DIM:
    return (f"head_dim {head_dim} exceeds {GPU_MAX_HEAD_DIM}, the most the Triton kernel's "
            f"shared-memory K/V blocks are sized for")
  if platform == "tpu" and tables and rows % block_size:
    return f"rows ({rows}) must be a whole number of {block_size}-row blocks on tpu"
  if platform == "tpu" and layout == "dense_blocks" and num_kv_heads > 1 and head_dim % LANES:
    return (f"per-head block tables over [B, N, K, D] need head_dim % {LANES} == 0 on tpu "
            f"(got K={num_kv_heads}, D={head_dim}); use a flat [B, N, D] buffer")
  if quant:
    return _quant_reason(platform, layout, num_kv_heads, head_dim, block_size, quant, group)
  return ""


def _quant_reason(platform: str, layout: str, num_kv_heads: int, head_dim: int,
                  block_size: int | None, quant: str, group: int) -> str:
  if quant not in MODES:
    return f"unknown code format {quant!r} (known: {', '.join(MODES)})"
  if group and head_dim % group:
    return f"scale groups of {group} values must divide head_dim {head_dim}"
  if quant == "int4" and head_dim % 2:
    return f"int4 codes pack two values a byte: head_dim must be even, got {head_dim}"
  if platform != "tpu":
    return ""
  if block_size and block_size % TPU_CODE_ROWS:
    return (f"quantized caches on tpu need blocks in multiples of {TPU_CODE_ROWS} rows, the "
            f"row tile of 1-byte codes; got {block_size}")
  if layout == "dense_blocks" and num_kv_heads > 1:
    return ("per-head block tables over quantized [B, N, K, D] codes would DMA scale columns "
            "narrower than 128 lanes on tpu; use a flat [B, N, D] buffer")
  return ""


def eligibility(platform: str, layout: str, *, num_heads: int, num_kv_heads: int,
                head_dim: int, rows: int, dtype, block_size: int | None = None,
                quant: str | None = None, group: int = 0) -> Eligibility:
  """Whether the decode kernel for `layout` runs on `platform` (`cuda`/`gpu`, `tpu`, `cpu`).

  rows: slots per sequence (S of a dense buffer, N of a flat one).
  block_size: rows per block-table entry (default 64), or the dense kernel's block (None: its
    own choice per backend).
  dtype: the values' dtype (of the cache, or that quantized codes are dequantized into).
  quant: the code format of a quantized cache (int8 | fp8 | int4; None: float values), with
    one scale per `group` values (0: per head).
  """
  reason = _reason(platform, layout, num_heads, num_kv_heads, head_dim, rows,
                   jnp.dtype(dtype).name, block_size, quant, group)
  return Eligibility(ok=not reason, reason=reason)
