"""jnp reference for `block_sparse_decode`: gather each head's listed blocks, then attend."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.layers.dot_product import dot_product_attention
from kvjax.pallas_kernels.block_sparse_decode import flat_rows
from kvjax.pallas_kernels.quantized import QuantizedKV, values


def gather_blocks(x_BxNxW: jax.Array, block_tables_BxKxM: jax.Array, block_size: int,
                  head_dim: int) -> jax.Array:
  """`[B, K, M*block_size, D]`: each head's listed rows, in table order."""
  b, k, m = block_tables_BxKxM.shape
  x_BxNxKxD = x_BxNxW.reshape(b, x_BxNxW.shape[1], -1, head_dim)
  rows_BxKxS = (block_tables_BxKxM[..., None] * block_size
                + jnp.arange(block_size)).reshape(b, k, m * block_size)
  cols_K = jnp.arange(k) if x_BxNxKxD.shape[2] == k else jnp.zeros((k,), jnp.int32)
  return x_BxNxKxD[jnp.arange(b)[:, None, None], rows_BxKxS, cols_K[None, :, None]]


def block_sparse_decode_ref(q_BxHxD: jax.Array, k: jax.Array | QuantizedKV,
                            v: jax.Array | QuantizedKV, block_tables_BxKxM: jax.Array,
                            num_tokens_BxK: jax.Array, *, block_size: int = 64) -> jax.Array:
  """Same contract as `block_sparse_decode`, in plain jnp (reads only the listed blocks;
  quantized K/V are dequantized into q's dtype first)."""
  b, h, d = q_BxHxD.shape
  kh = num_tokens_BxK.shape[1]
  k_BxKxSxD, v_BxKxSxD = (gather_blocks(flat_rows(values(x, q_BxHxD.dtype)), block_tables_BxKxM,
                                        block_size, d) for x in (k, v))
  t = k_BxKxSxD.shape[2]
  mask_BKx1xS = (jnp.arange(t) < num_tokens_BxK[..., None]).reshape(b * kh, 1, t)
  out_BKx1xGxD = dot_product_attention(q_BxHxD.reshape(b * kh, 1, h // kh, d),
                                       k_BxKxSxD.reshape(b * kh, t, 1, d),
                                       v_BxKxSxD.reshape(b * kh, t, 1, d), mask_BKx1xS)
  return out_BKx1xGxD.reshape(b, h, d)
