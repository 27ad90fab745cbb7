"""Dense boolean masks that MoA's sparse paths stand for (references for tests and analysis).

- Prefill (block level, per query head): query block m sees key blocks m+1-num_local .. m, and
  the first `sink` tokens; token-causal.
- Decode (token level, per query head): a step at position t sees the first `sink` tokens and
  the `window` most recent ones, which is exactly what a ring buffer of `sink + window` slots
  holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def prefill_mask(t: int, num_local: Sequence[int], block: int, sink: int) -> np.ndarray:
  """`[H, T, T]` mask of a length-`t` sequence starting at position 0."""
  i = np.arange(t)[:, None]
  j = np.arange(t)[None, :]
  band_HxTxT = (j // block)[None] > (i // block)[None] - np.asarray(num_local)[:, None, None]
  return (j <= i)[None] & (band_HxTxT | (j < sink)[None])


def decode_mask(q_pos_BxT: jax.Array, k_pos_BxS: jax.Array, windows: Sequence[int],
                sink: int) -> jax.Array:
  """`[B, H, T, S]`: key position p is visible to query position t iff p <= t and
  (p < sink or t - p < window_h)."""
  q = q_pos_BxT[:, None, :, None]
  p = k_pos_BxS[:, None, None, :]
  window_1xHx1x1 = jnp.asarray(windows, jnp.int32)[None, :, None, None]
  return (p <= q) & ((p < sink) | (q - p < window_1xHx1x1))

