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

import functools

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def causal_mask(q_pos_BxT: jax.Array, k_pos_BxS: jax.Array) -> jax.Array:
  """`[B, T, S]`: the query at position p sees keys at positions <= p."""
  return k_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None]


def _by_kv_head(x: jax.Array, k: int) -> jax.Array:
  """A mask or keep flags `[B, T, S]`, `[B, K, T, S]` or `[B, H, T, S]` as `[B, K|1, T, G|1, S]`."""
  if x.ndim == 3:
    return x[:, None, :, None]
  return x.reshape(x.shape[0], k, -1, *x.shape[2:]).transpose(0, 1, 3, 2, 4)


def _masked_softmax(logits: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  """Masked softmax over `axis`; rows with nothing visible give zeros."""
  probs = jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=axis)
  return jnp.where(mask, probs, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flagged_softmax(logits: jax.Array, mask: jax.Array, keep: jax.Array,
                     axis: int) -> jax.Array:
  """`_masked_softmax` that also hides the keys whose flag is 0: exactly the masked result.

  A flag's cotangent is the loss's derivative w.r.t. a shift of its key's logit, taken for a
  hidden key as if it alone were shown: `p~ (g - <p, g>)`, with `p~` its probability among the
  shown keys and itself (at most 1), so it stays bounded where renormalising probabilities by the
  mass Z left on shown keys divided by Z."""
  return _masked_softmax(logits, mask & (keep > 0.5), axis)


def _flagged_softmax_fwd(logits, mask, keep, axis):
  shown = mask & (keep > 0.5)
  probs = _masked_softmax(logits, shown, axis)
  return probs, (logits, mask, shown, probs, keep)


def _flagged_softmax_bwd(axis, residuals, g):
  logits, mask, shown, probs, keep = residuals
  centred = g - (probs * g).sum(axis=axis, keepdims=True)
  d_logits = probs * centred
  lse = jax.nn.logsumexp(jnp.where(shown, logits, NEG_INF), axis=axis, keepdims=True)
  alone = jax.nn.sigmoid(logits - lse)  # a hidden key's probability if it alone were shown
  d_keep = jnp.where(shown, d_logits, jnp.where(mask, alone * centred, 0.0))
  return d_logits, None, d_keep.astype(keep.dtype)


_flagged_softmax.defvjp(_flagged_softmax_fwd, _flagged_softmax_bwd)


def _softmax(logits: jax.Array, mask: jax.Array, keep: jax.Array | None,
             axis: int) -> jax.Array:
  """Masked softmax over `axis`; `keep` (0/1 flags, broadcast to the logits) hides more keys."""
  if keep is None:
    return _masked_softmax(logits, mask, axis)
  return _flagged_softmax(logits, mask, jnp.broadcast_to(keep, logits.shape), axis)


def dot_product_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                          mask: jax.Array, keep_BxKxTxS: jax.Array | None = None) -> jax.Array:
  """Softmax attention where each K/V head serves G = H/K query heads; float32 logits, the
  output in the queries' dtype.

  `mask` is `[B, T, S]` for all heads, or per head: `[B, K, T, S]` or `[B, H, T, S]`.
  Rows whose mask is all False return zeros rather than NaN.
  `keep_BxKxTxS` (optional, 0/1 flags per K/V head) hides the keys flagged 0 in logit space:
  exactly the masked result. Their cotangent is that of a key's logit shift, bounded for hidden
  keys too (`_flagged_softmax`), so that a straight-through estimator on the log of a gate's
  score behind the flags gets a finite gradient however little mass is left on shown keys.
  """
  b, t, h, d = q_BxTxHxD.shape
  s, k = k_BxSxKxD.shape[1:3]
  g = h // k
  mask_BxKxTxGxS = _by_kv_head(mask, k)
  keep_BxKxTx1xS = None if keep_BxKxTxS is None else _by_kv_head(keep_BxKxTxS, k)
  if t == 1:
    return _one_query(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxKxTxGxS, keep_BxKxTx1xS)
  q_BxKxTGxD = q_BxTxHxD.reshape(b, t, k, g, d).transpose(0, 2, 1, 3, 4).reshape(b, k, t * g, d)
  logits_BxKxTGxS = jnp.einsum("bkmd,bskd->bkms", q_BxKxTGxD, k_BxSxKxD,
                              preferred_element_type=jnp.float32) * (d ** -0.5)
  probs_BxKxTxGxS = _softmax(logits_BxKxTGxS.reshape(b, k, t, g, s), mask_BxKxTxGxS,
                             keep_BxKxTx1xS, axis=-1)
  out_BxKxTGxD = jnp.einsum("bkms,bskd->bkmd",
                           probs_BxKxTxGxS.reshape(b, k, t * g, s).astype(v_BxSxKxD.dtype),
                           v_BxSxKxD, preferred_element_type=jnp.float32)
  out_BxTxKxGxD = out_BxKxTGxD.reshape(b, k, t, g, d).transpose(0, 2, 1, 3, 4)
  return out_BxTxKxGxD.reshape(b, t, h, d).astype(q_BxTxHxD.dtype)


def _one_query(q_Bx1xHxD, k_BxSxKxD, v_BxSxKxD, mask_BxKx1xGxS, keep_BxKx1x1xS):
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
                           None if keep_BxKx1x1xS is None else to_bskg(keep_BxKx1x1xS),
                           axis=1)
  out_BxKxGxD = jnp.einsum("bskg,bskd->bkgd", probs_BxSxKxG.astype(v_BxSxKxD.dtype), v_BxSxKxD,
                           preferred_element_type=jnp.float32)
  return out_BxKxGxD.reshape(b, 1, h, d).astype(q_Bx1xHxD.dtype)
