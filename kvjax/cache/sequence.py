"""Full-sequence layouts: attention within the chunk it is given, storing nothing. Training and
scoring pass one per layer (a model called without a cache); they are the masked references the
caches are tested against.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from kvjax.layers.cache import Chunk, Layout
from kvjax.layers.dot_product import causal_mask, dot_product_attention


def visible_flags(keep_BxSxK: jax.Array, q_pos_BxT: jax.Array, k_pos_BxS: jax.Array,
                  recent: int = 0) -> jax.Array:
  """`[B, K, T, S]` keep flags for `dot_product_attention`: key s is shown to query t iff it is
  kept or at most `recent` positions before t (its own token included: a filter cannot hide a
  token from itself); keep's gradient passes through for the rest."""
  distance_BxTxS = q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]
  near_BxTxS = (distance_BxTxS >= 0) & (distance_BxTxS <= recent)
  return jnp.where(near_BxTxS[:, None], 1.0, jnp.moveaxis(keep_BxSxK, 2, 1)[:, :, None, :])


@flax.struct.dataclass
class CausalLayout(Layout):
  """Causal attention within the chunk; a K/V filter's keep flags hide the tokens it drops from
  queries more than `recent` positions later."""

  recent: int = flax.struct.field(pytree_node=False, default=0)

  def write(self, chunk: Chunk) -> CausalLayout:  # noqa: ARG002 (attention reads the chunk)
    return self

  def attend(self, q_BxTxHxD: jax.Array, chunk: Chunk) -> tuple[jax.Array, CausalLayout]:
    pos_BxT = chunk.positions
    keep = (None if chunk.keep is None
            else visible_flags(chunk.keep, pos_BxT, pos_BxT, self.recent))
    return dot_product_attention(q_BxTxHxD, chunk.k, chunk.v, causal_mask(pos_BxT, pos_BxT),
                                 keep), self


@flax.struct.dataclass
class MaskedLayout(Layout):
  """Attention within the chunk under an explicit mask: `[B, T, T]`, or per head `[B, K or H,
  T, T]` (a traced array, so many masks share one compilation)."""

  mask: jax.Array

  def write(self, chunk: Chunk) -> MaskedLayout:  # noqa: ARG002 (attention reads the chunk)
    return self

  def attend(self, q_BxTxHxD: jax.Array, chunk: Chunk) -> tuple[jax.Array, MaskedLayout]:
    return dot_product_attention(q_BxTxHxD, chunk.k, chunk.v, self.mask), self
