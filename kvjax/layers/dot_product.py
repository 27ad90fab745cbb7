"""Softmax attention with grouped K/V heads: the dense reference every layout and kernel checks
against. A leaf module (jax only), so the kernels' references can import it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def causal_mask(q_pos_BxT: jax.Array, k_pos_BxS: jax.Array) -> jax.Array:
  """`[B, T, S]`: the query at position p sees keys at positions <= p."""
  return k_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None]


def dot_product_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                          mask: jax.Array, weights_BxKxTxS: jax.Array | None = None) -> jax.Array:
  """Softmax attention where each K/V head serves G = H/K query heads; float32 logits.

  `mask` is `[B, T, S]` for all heads, or per head: `[B, K, T, S]` or `[B, H, T, S]`.
  Rows whose mask is all False return zeros rather than NaN.
  `weights_BxKxTxS` (optional, in [0, 1]) rescale the probabilities, which are then
  renormalised: 0/1 weights give the masked result, and a straight-through estimator behind
  them still gets a gradient for the keys they drop (those keep their softmax share).
  """
  b, t, h, d = q_BxTxHxD.shape
  k = k_BxSxKxD.shape[2]
  q_BxTxKxGxD = q_BxTxHxD.reshape(b, t, k, h // k, d)
  logits_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                                preferred_element_type=jnp.float32) * (d ** -0.5)
  # Broadcast against the logits: K and G of the mask may be 1.
  if mask.ndim == 3:
    mask_BxKxGxTxS = mask[:, None, None]
  else:
    mask_BxKxGxTxS = mask.reshape(b, k, -1, *mask.shape[2:])
  logits_BxKxGxTxS = jnp.where(mask_BxKxGxTxS, logits_BxKxGxTxS, NEG_INF)
  probs_BxKxGxTxS = jax.nn.softmax(logits_BxKxGxTxS, axis=-1)
  probs_BxKxGxTxS = jnp.where(mask_BxKxGxTxS, probs_BxKxGxTxS, 0.0)
  if weights_BxKxTxS is not None:
    probs_BxKxGxTxS = probs_BxKxGxTxS * weights_BxKxTxS[:, :, None]
    probs_BxKxGxTxS = probs_BxKxGxTxS / jnp.maximum(
        probs_BxKxGxTxS.sum(axis=-1, keepdims=True), 1e-30)
  probs_BxKxGxTxS = probs_BxKxGxTxS.astype(v_BxSxKxD.dtype)
  out_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", probs_BxKxGxTxS, v_BxSxKxD)
  return out_BxTxKxGxD.reshape(b, t, h, d)
