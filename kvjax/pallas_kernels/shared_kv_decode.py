"""Decode attention for a dense cache whose KV heads each serve a group of query heads.

GQA, MQA and CLA's shared buffers all look like this: `[B, S, K, D]` keys and values, query
heads `h*G .. h*G+G-1` reading KV head h. One program handles a whole group (on TPU a tile of
KV heads), so every K/V block is loaded once; blocks past a sequence's length are not read.
A scanned model's `[G, B, S, K, D]` stack is read at `stack_index` in place, without slicing
the layer out (a copy of the layer every step). On a CPU backend the kernel runs in interpret
mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.pallas_kernels.blocked_decode import blocked_decode
from kvjax.pallas_kernels.quantized import QuantizedKV, kv_map


def shared_kv_decode(q_BxHxD: jax.Array, k_BxSxKxD: jax.Array | QuantizedKV,
                     v_BxSxKxD: jax.Array | QuantizedKV,
                     lengths_B: jax.Array, *, stack_index: jax.Array | int | None = None,
                     block_size: int | None = None, num_splits: int | None = None,
                     backend: str | None = None, interpret=None) -> jax.Array:
  """One query per sequence over cache slots `< lengths[b]`; returns `[B, H, D]`.

  k, v: values, or `QuantizedKV` codes and scales that the kernel dequantizes into q's dtype.
  stack_index: with `[G, B, S, K, D]` buffers, the layer to read (an int32 scalar).
  Keyword options as in `blocked_decode`; `eligibility(platform, "dense" or "stacked", ...)`
  says where the kernel applies.
  """
  stacked = stack_index is not None
  if len(k_BxSxKxD.shape) != 4 + stacked:
    want = "[G, B, S, K, D] with stack_index" if stacked else "[B, S, K, D]"
    raise ValueError(f"K/V must be {want}, got shape {k_BxSxKxD.shape}")
  *lead, s, k, _ = k_BxSxKxD.shape
  view = functools.partial(kv_map, lambda x: x.reshape(*([1] * (not stacked)), *lead, s, -1))
  num_tokens_BxK = jnp.broadcast_to(jnp.minimum(lengths_B, s)[:, None], (lead[-1], k))
  return blocked_decode(q_BxHxD, view(k_BxSxKxD), view(v_BxSxKxD),
                        stack_index if stacked else 0, num_tokens_BxK, None,
                        layout="stacked" if stacked else "dense", block_size=block_size,
                        num_splits=num_splits, backend=backend, interpret=interpret)
