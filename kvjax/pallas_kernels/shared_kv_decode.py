"""Decode attention for a dense cache whose KV heads each serve a group of query heads.

GQA, MQA and CLA's shared buffers all look like this: `[B, S, K, D]` keys and values, query
heads `h*G .. h*G+G-1` reading KV head h. One program handles a whole group, so every K/V block
is loaded once; the sequence is split for parallelism and merged by log-sum-exp; blocks past a
sequence's length are not read. On a CPU backend the kernel runs in interpret mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.pallas_kernels.blocked_decode import blocked_decode


def shared_kv_decode(q_BxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                     lengths_B: jax.Array, *, block_size: int = 64, num_splits: int | None = None,
                     backend: str | None = None, interpret: bool | None = None) -> jax.Array:
  """One query per sequence over cache slots `< lengths[b]`; returns `[B, H, D]`.

  On TPU the `[B, S, K*D]` view needs `D % 128 == 0` unless K == 1 (Mosaic block rules).
  Keyword options as in `blocked_decode`.
  """
  b, s, k, d = k_BxSxKxD.shape
  num_tokens_BxK = jnp.broadcast_to(jnp.minimum(lengths_B, s)[:, None], (b, k))
  return blocked_decode(q_BxHxD, k_BxSxKxD.reshape(b, s, k * d), v_BxSxKxD.reshape(b, s, k * d),
                        num_tokens_BxK, None, block_size=block_size, num_splits=num_splits,
                        backend=backend, interpret=interpret)
