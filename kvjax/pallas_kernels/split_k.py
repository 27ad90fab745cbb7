"""Flash-decoding math shared by every decode kernel and backend.

A kernel program walks a run of K/V blocks with an online softmax and leaves an unnormalised
partial `(acc, m, l)` per split of the sequence; `combine_splits` merges the splits with a
log-sum-exp rescale. Splitting the sequence keeps the GPU busy when batch x heads is small.
Empty splits carry `m = NEG_INF, l = 0` and drop out of the combine; a row with no valid key
anywhere comes out as zeros, like `dot_product_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.layers.dot_product import NEG_INF

MIN_GROUP_ROWS = 16  # Triton dots need every dimension >= 16


def group_rows(group: int) -> int:
  """Query rows per KV head after padding: a power of two >= 16 (Triton's shape rules)."""
  return max(MIN_GROUP_ROWS, 1 << (group - 1).bit_length())


def group_queries(q_BxHxD: jax.Array, num_kv_heads: int) -> jax.Array:
  """`[B, H, D] -> [B, K, Gp, D]`: the query heads of each KV head, zero-padded to Gp rows."""
  b, h, d = q_BxHxD.shape
  if h % num_kv_heads:
    raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({num_kv_heads})")
  g = h // num_kv_heads
  q_BxKxGxD = q_BxHxD.reshape(b, num_kv_heads, g, d)
  return jnp.pad(q_BxKxGxD, ((0, 0), (0, 0), (0, group_rows(g) - g), (0, 0)))


def default_num_splits(batch: int, num_kv_heads: int, max_blocks: int,
                       target_programs: int = 512, min_blocks_per_split: int = 4) -> int:
  """Splits per (sequence, KV head): enough programs to fill a GPU, few enough partials."""
  want = -(-target_programs // (batch * num_kv_heads))
  return max(1, min(want, -(-max_blocks // min_blocks_per_split)))


def num_blocks_of(num_tokens, block_size: int):
  """Blocks holding `num_tokens` tokens (`lax.div`: plain integer division in every kernel)."""
  return jax.lax.div(num_tokens + block_size - 1, block_size)


def split_range(num_blocks, split, num_splits: int):
  """Blocks `[start, stop)` of this split: a (sequence, head)'s blocks cut into even runs."""
  per = jax.lax.div(num_blocks + num_splits - 1, num_splits)
  start = split * per
  return start, jnp.minimum(start + per, num_blocks)


def online_softmax_step(q_GxD, k_SxD, v_SxD, first_pos, num_tokens, m_Gx1, l_Gx1, acc_GxD, *,
                        scale: float):
  """Folds one K/V block whose first key is the list's `first_pos`-th token into the partial.

  Keys at list positions `>= num_tokens` are masked, and their V rows zeroed, so whatever the
  buffer holds past the valid tokens (stale or uninitialised memory) cannot leak in as NaN.
  """
  s = k_SxD.shape[0]
  precision = jax.lax.Precision.HIGHEST if q_GxD.dtype == jnp.float32 else None
  valid_1xS = first_pos + jax.lax.broadcasted_iota(jnp.int32, (1, s), 1) < num_tokens
  valid_Sx1 = first_pos + jax.lax.broadcasted_iota(jnp.int32, (s, 1), 0) < num_tokens
  logits_GxS = jax.lax.dot_general(q_GxD, k_SxD, (((1,), (1,)), ((), ())), precision=precision,
                                   preferred_element_type=jnp.float32) * scale
  logits_GxS = jnp.where(valid_1xS, logits_GxS, NEG_INF)
  m_new_Gx1 = jnp.maximum(m_Gx1, logits_GxS.max(axis=1, keepdims=True))
  alpha_Gx1 = jnp.exp(m_Gx1 - m_new_Gx1)
  p_GxS = jnp.where(valid_1xS, jnp.exp(logits_GxS - m_new_Gx1), 0.0)
  l_Gx1 = alpha_Gx1 * l_Gx1 + p_GxS.sum(axis=1, keepdims=True)
  v_SxD = jnp.where(valid_Sx1, v_SxD, jnp.zeros_like(v_SxD))
  pv_GxD = jax.lax.dot_general(p_GxS.astype(v_SxD.dtype), v_SxD, (((1,), (0,)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)
  return m_new_Gx1, l_Gx1, alpha_Gx1 * acc_GxD + pv_GxD


def init_partial(rows: int, head_dim: int):
  """The empty partial: `(m, l, acc)` for no keys seen yet."""
  return (jnp.full((rows, 1), NEG_INF, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
          jnp.zeros((rows, head_dim), jnp.float32))


def combine_splits(acc_BxKxPxGxD, m_BxKxPxGx1, l_BxKxPxGx1, group: int, dtype) -> jax.Array:
  """Merges the splits' partials into `[B, H, D]` (padded query rows dropped)."""
  m_BxKx1xGx1 = m_BxKxPxGx1.max(axis=2, keepdims=True)
  w_BxKxPxGx1 = jnp.exp(m_BxKxPxGx1 - m_BxKx1xGx1)
  l_BxKxGx1 = (w_BxKxPxGx1 * l_BxKxPxGx1).sum(axis=2)
  acc_BxKxGxD = (w_BxKxPxGx1 * acc_BxKxPxGxD).sum(axis=2)
  out_BxKxGxD = jnp.where(l_BxKxGx1 > 0, acc_BxKxGxD / jnp.where(l_BxKxGx1 > 0, l_BxKxGx1, 1.0),
                          0.0)
  b, k, _, d = out_BxKxGxD.shape
  return out_BxKxGxD[:, :, :group].reshape(b, k * group, d).astype(dtype)
