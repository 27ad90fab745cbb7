"""jnp reference for `shared_kv_decode`: masked dense attention over the whole cache (quantized
K/V dequantized, then attended)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.layers.dot_product import dot_product_attention
from kvjax.pallas_kernels.quantized import QuantizedKV, values


def shared_kv_decode_ref(q_BxHxD: jax.Array, k_BxSxKxD: jax.Array | QuantizedKV,
                         v_BxSxKxD: jax.Array | QuantizedKV, lengths_B: jax.Array) -> jax.Array:
  """Query b sees the cache slots `< lengths[b]`; returns `[B, H, D]`. Quantized K/V are
  dequantized into q's dtype first."""
  k_BxSxKxD, v_BxSxKxD = (values(x, q_BxHxD.dtype) for x in (k_BxSxKxD, v_BxSxKxD))
  slots_S = jnp.arange(k_BxSxKxD.shape[1], dtype=jnp.int32)
  mask_Bx1xS = (slots_S[None, :] < lengths_B[:, None])[:, None, :]
  return dot_product_attention(q_BxHxD[:, None], k_BxSxKxD, v_BxSxKxD, mask_Bx1xS)[:, 0]
