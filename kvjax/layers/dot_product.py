"""Softmax attention with grouped K/V heads: the dense reference every layout and kernel checks
against. A leaf module (jax only), so the kernels' references can import it.

Keys and values arrive as a cache stores them, `[B, S, K, D]`. Several queries per sequence
(prefill, training) run as batched matmuls per K/V head, queries and probabilities laid out
`[B, K, T*G, ...]` so that neither operand of either product is transposed at the size of the
logits. One query per sequence (a decode step) is bound by reading the keys and values: its products
keep the cache's `[B, S, K, D]` order, since heads-major operands would first copy the whole
cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def causal_mask(q_pos_BxT: jax.Array, k_pos_BxS: jax.Array) -> jax.Array:
  """`[B, T, S]`: the query at position p sees keys at positions <= p."""
  return k_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None]


def _by_kv_head(x: jax.Array, k: int) -> jax.Array:
  """A mask or weights `[B, T, S]`, `[B, K, T, S]` or `[B, H, T, S]` as `[B, K|1, T, G|1, S]`."""
  if x.ndim == 3:
    return x[:, None, :, None]
  return x.reshape(x.shape[0], k, -1, *x.shape[2:]).transpose(0, 1, 3, 2, 4)


def _softmax(logits: jax.Array, mask: jax.Array, weights: jax.Array | None,
             axis: int) -> jax.Array:
  """Masked softmax over `axis`; rows with nothing visible give zeros. `weights` rescale the
  probabilities, which are then renormalised."""
  probs = jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=axis)
  probs = jnp.where(mask, probs, 0.0)
  if weights is None:
    return probs
  probs = probs * weights
  return probs / jnp.maximum(probs.sum(axis=axis, keepdims=True), 1e-30)


def dot_product_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                          mask: jax.Array, weights_BxKxTxS: jax.Array | None = None) -> jax.Array:
  """Softmax attention where each K/V head serves G = H/K query heads; float32 logits, the
  output in the queries' dtype.

  `mask` is `[B, T, S]` for all heads, or per head: `[B, K, T, S]` or `[B, H, T, S]`.
  Rows whose mask is all False return zeros rather than NaN.
  `weights_BxKxTxS` (optional, in [0, 1]) rescale the probabilities, which are then
  renormalised: 0/1 weights give the masked result, and a straight-through estimator behind
  them still gets a gradient for the keys they drop (those keep their softmax share).
  """
  b, t, h, d = q_BxTxHxD.shape
  s, k = k_BxSxKxD.shape[1:3]
  g = h // k
  mask_BxKxTxGxS = _by_kv_head(mask, k)
  weights_BxKxTx1xS = None if weights_BxKxTxS is None else _by_kv_head(weights_BxKxTxS, k)
  if t == 1:
    return _one_query(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxKxTxGxS, weights_BxKxTx1xS)
  q_BxKxTGxD = q_BxTxHxD.reshape(b, t, k, g, d).transpose(0, 2, 1, 3, 4).reshape(b, k, t * g, d)
  logits_BxKxTGxS = jnp.einsum("bkmd,bskd->bkms", q_BxKxTGxD, k_BxSxKxD,
                              preferred_element_type=jnp.float32) * (d ** -0.5)
  probs_BxKxTxGxS = _softmax(logits_BxKxTGxS.reshape(b, k, t, g, s), mask_BxKxTxGxS,
                             weights_BxKxTx1xS, axis=-1)
  out_BxKxTGxD = jnp.einsum("bkms,bskd->bkmd",
                           probs_BxKxTxGxS.reshape(b, k, t * g, s).astype(v_BxSxKxD.dtype),
                           v_BxSxKxD, preferred_element_type=jnp.float32)
  out_BxTxKxGxD = out_BxKxTGxD.reshape(b, k, t, g, d).transpose(0, 2, 1, 3, 4)
  return out_BxTxKxGxD.reshape(b, t, h, d).astype(q_BxTxHxD.dtype)


def _one_query(q_Bx1xHxD, k_BxSxKxD, v_BxSxKxD, mask_BxKx1xGxS, weights_BxKx1x1xS):
  """`dot_product_attention` for T = 1, contracting keys and values in their `[B, S, K, D]`
  order: S stays a free axis of both products, so neither copies the cache heads-major, and no
  operand is broadcast over the G query heads (a broadcast that XLA's CPU backend materialises
  and fuses badly when two layers read one cache, as cross-layer attention does)."""
  b, _, h, d = q_Bx1xHxD.shape
  k = k_BxSxKxD.shape[2]
  to_bskg = lambda x: jnp.moveaxis(x[:, :, 0], -1, 1)  # [B, K, G, S] -> [B, S, K, G]
  q_BxKxGxD = q_Bx1xHxD.reshape(b, k, h // k, d)
  logits_BxSxKxG = jnp.einsum("bkgd,bskd->bskg", q_BxKxGxD, k_BxSxKxD,
                              preferred_element_type=jnp.float32) * (d ** -0.5)
  probs_BxSxKxG = _softmax(logits_BxSxKxG, to_bskg(mask_BxKx1xGxS),
                           None if weights_BxKx1x1xS is None else to_bskg(weights_BxKx1x1xS),
                           axis=1)
  out_BxKxGxD = jnp.einsum("bskg,bskd->bkgd", probs_BxSxKxG.astype(v_BxSxKxD.dtype), v_BxSxKxD,
                           preferred_element_type=jnp.float32)
  return out_BxKxGxD.reshape(b, 1, h, d).astype(q_Bx1xHxD.dtype)
