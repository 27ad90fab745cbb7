"""Block-sparse causal attention for a MoA plan: each query head reads its sink block and its
local band of key blocks only, so compute scales with the plan's density.

Heads are grouped by band width (a static plan has few distinct widths per layer); each group
gathers its `num_local + 1` key blocks per query block and attends within them. A group whose
band covers every block runs dense causal attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.layers.dot_product import NEG_INF, causal_mask, dot_product_attention


def _band_attention(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, num_local: int, block: int, sink: int):
  """One key/value head per query head; T a multiple of `block`."""
  b, t, h, d = q_BxTxHxD.shape
  nb = t // block
  m_M = np.arange(nb)
  # Entry 0 is the sink block, then the band; an entry outside the sequence, or a sink entry
  # the band already covers, is masked out.
  idx_MxJ = np.concatenate([np.zeros((nb, 1), int), m_M[:, None] - num_local + 1
                            + np.arange(num_local)[None]], axis=1)
  live_MxJ = np.concatenate([(m_M >= num_local)[:, None], idx_MxJ[:, 1:] >= 0], axis=1)
  idx_MxJ = np.maximum(idx_MxJ, 0)
  q_pos_MxC = m_M[:, None] * block + np.arange(block)
  k_pos_MxJxC = idx_MxJ[..., None] * block + np.arange(block)
  mask_MxCxJxC = (live_MxJ[:, None, :, None]
                  & (k_pos_MxJxC[:, None] <= q_pos_MxC[:, :, None, None])
                  & ((np.arange(idx_MxJ.shape[1]) > 0)[None, None, :, None]
                     | (k_pos_MxJxC[:, None] < sink)))
  blocks = lambda x: x.reshape(b, nb, block, h, d)
  k_BxMxJxCxHxD = blocks(k_BxTxHxD)[:, idx_MxJ]
  v_BxMxJxCxHxD = blocks(v_BxTxHxD)[:, idx_MxJ]
  logits = jnp.einsum("bmqhd,bmjkhd->bhmqjk", blocks(q_BxTxHxD), k_BxMxJxCxHxD,
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  logits = jnp.where(mask_MxCxJxC, logits, NEG_INF)
  shape = logits.shape
  probs = jax.nn.softmax(logits.reshape(*shape[:4], -1), axis=-1).reshape(shape)
  out = jnp.einsum("bhmqjk,bmjkhd->bmqhd", probs.astype(v_BxTxHxD.dtype), v_BxMxJxCxHxD)
  return out.reshape(b, t, h, d)


def block_sparse_attention(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array,
                           num_local: Sequence[int], *, block: int, sink: int) -> jax.Array:
  """Attention of a sequence starting at position 0 under `masks.prefill_mask`."""
  b, t, h, d = q_BxTxHxD.shape
  g = h // k_BxTxKxD.shape[2]
  nb = -(-t // block)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, nb * block - t), (0, 0), (0, 0)))
  q, k, v = pad(q_BxTxHxD), pad(k_BxTxKxD), pad(v_BxTxKxD)
  out_BxTxHxD = jnp.zeros_like(q)
  for nl in sorted(set(num_local)):
    heads = np.array([i for i, n in enumerate(num_local) if n == nl])
    qh, kh, vh = q[:, :, heads], k[:, :, heads // g], v[:, :, heads // g]
    if nl >= nb:
      pos_BxT = jnp.broadcast_to(jnp.arange(nb * block), (b, nb * block))
      o = dot_product_attention(qh, kh, vh, causal_mask(pos_BxT, pos_BxT))
    else:
      o = _band_attention(qh, kh, vh, nl, block, sink)
    out_BxTxHxD = out_BxTxHxD.at[:, :, heads].set(o)
  return out_BxTxHxD[:, :t]
