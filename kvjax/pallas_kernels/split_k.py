"""Flash-decoding math shared by every decode kernel and backend.

A kernel program walks a run of K/V rows with an online softmax and leaves an unnormalised
partial `(acc, m, l)` per split of the sequence; `combine_splits` merges the splits with a
log-sum-exp rescale. Empty splits carry `m = NEG_INF, l = 0` and drop out of the combine; a row
with no valid key anywhere comes out as zeros, like `dot_product_attention`.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp

from kvjax.layers.dot_product import NEG_INF


def num_blocks_of(num_tokens, block_size: int):
  """Blocks holding `num_tokens` tokens (`lax.div`: plain integer division in every kernel)."""
  return jax.lax.div(num_tokens + block_size - 1, block_size)


def split_range(num_blocks, split, num_splits: int):
  """Blocks `[start, stop)` of this split: a (sequence, head)'s blocks cut into even runs."""
  per = jax.lax.div(num_blocks + num_splits - 1, num_splits)
  start = jnp.minimum(split * per, num_blocks)
  return start, jnp.minimum(start + per, num_blocks)


def _dot(a, b, contract_b: int, fma: bool):
  """`a @ b` (`contract_b=0`) or `a @ b.T` (`contract_b=1`) in float32: an MXU / tensor-core
  dot, or broadcast multiply + reduce (`fma`: no padded rows, exact float32 products).

  float32 dots run at HIGHEST precision (IEEE FMAs in Triton, six bf16 passes on a TPU MXU),
  never TF32 or one bf16 pass.
  """
  if fma:
    a, b = a.astype(jnp.float32), b[None].astype(jnp.float32)
    if contract_b == 1:
      return jnp.sum(a[:, None, :] * b, axis=2)
    return jnp.sum(a[:, :, None] * b, axis=1)
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def online_softmax_step(q_parts, k_parts, v_parts, first_pos, end, m_Qx1, l_Qx1, acc_parts, *,
                        scale: float, fma: bool = False):
  """Folds S keys, the list's positions `first_pos .. first_pos+S-1`, into the partial.

  Rows are read as column parts (`q_QxW`, `k_SxW`, `v_SxW` and `acc_QxW` each): one, or int4
  codes' two halves, whose products add up to the logits and whose P @ V products are the
  halves of the output.
  Positions `>= end` are masked and their V rows zeroed, so whatever the buffer holds there
  (stale or uninitialised memory, NaN included) cannot leak into the result.
  """
  s = k_parts[0].shape[0]
  valid_1xS = first_pos + jax.lax.broadcasted_iota(jnp.int32, (1, s), 1) < end
  valid_Sx1 = first_pos + jax.lax.broadcasted_iota(jnp.int32, (s, 1), 0) < end
  scores_QxS = functools.reduce(operator.add, (_dot(q_QxW, k_SxW, 1, fma)
                                                for q_QxW, k_SxW in zip(q_parts, k_parts)))
  logits_QxS = jnp.where(valid_1xS, scores_QxS * scale, NEG_INF)
  m_new_Qx1 = jnp.maximum(m_Qx1, logits_QxS.max(axis=1, keepdims=True))
  alpha_Qx1 = jnp.exp(m_Qx1 - m_new_Qx1)
  p_QxS = jnp.where(valid_1xS, jnp.exp(logits_QxS - m_new_Qx1), 0.0)
  l_Qx1 = alpha_Qx1 * l_Qx1 + p_QxS.sum(axis=1, keepdims=True)
  accs = []
  for v_SxW, acc_QxW in zip(v_parts, acc_parts):
    # The select runs in float32: some TPU generations have no bf16 vector unit.
    v_SxW = jnp.where(valid_Sx1, v_SxW.astype(jnp.float32), 0.0).astype(v_SxW.dtype)
    pv_QxW = _dot(p_QxS if fma else p_QxS.astype(v_SxW.dtype), v_SxW, 0, fma)
    accs.append(alpha_Qx1 * acc_QxW + pv_QxW)
  return m_new_Qx1, l_Qx1, tuple(accs)


def init_partial(rows: int, width: int, parts: int = 1):
  """The empty partial: `(m, l, acc parts)` for no keys seen yet."""
  return (jnp.full((rows, 1), NEG_INF, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
          tuple(jnp.zeros((rows, width), jnp.float32) for _ in range(parts)))


def combine_splits(acc_BxXxPxQxW, m_BxXxPxQx1, l_BxXxPxQx1) -> jax.Array:
  """Merges the splits' partials (axis 2) into normalised float32 rows `[B, X, Q, W]`."""
  m_BxXx1xQx1 = m_BxXxPxQx1.max(axis=2, keepdims=True)
  w_BxXxPxQx1 = jnp.exp(m_BxXxPxQx1 - m_BxXx1xQx1)
  l_BxXxQx1 = (w_BxXxPxQx1 * l_BxXxPxQx1).sum(axis=2)
  acc_BxXxQxW = (w_BxXxPxQx1 * acc_BxXxPxQxW).sum(axis=2)
  return jnp.where(l_BxXxQx1 > 0, acc_BxXxQxW / jnp.where(l_BxXxQx1 > 0, l_BxXxQx1, 1.0), 0.0)
