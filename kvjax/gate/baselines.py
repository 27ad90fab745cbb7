"""Eviction baselines at a given keep count, on the same compacted cache as the gate: the
policies of `kvjax.decode.eviction` (StreamingLLM, local window, random, H2O, TOVA, SnapKV),
which also serve as the `model.eviction` cache setting.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kvjax.decode.compact_cache import CompactKVCache
from kvjax.decode.eviction import (ATTENTION_POLICIES, POLICIES, apply_with_cache,
                                   init_eviction_cache, keep_top, key_scores, observed_attention)
from kvjax.decode.eviction import attention_probs as _attention_probs

BASELINES = POLICIES


def attention_probs(q_BxSxHxD: jax.Array, k_BxSxKxD: jax.Array) -> jax.Array:
  """Causal attention probabilities of a prompt, averaged over each K/V head's query heads:
  `[B, K, S_query, S_key]`."""
  b, s = q_BxSxHxD.shape[:2]
  pos_BxS = jnp.broadcast_to(jnp.arange(s), (b, s))
  return _attention_probs(q_BxSxHxD, k_BxSxKxD, pos_BxS, pos_BxS)


def baseline_keep(method: str, n: int, probs_BxKxSxS: jax.Array | None, shape_BxK: tuple,
                  s: int, rng: jax.Array) -> jax.Array:
  """`[B, S, K]` flags marking exactly `n` tokens per sequence and K/V head of whole prompts.

  `probs_BxKxSxS` (from `attention_probs`) is needed by the attention-based methods only.
  """
  if not 0 < n <= s:
    raise ValueError(f"keep count must be in 1..{s} (the prompt length), got {n}")
  b = shape_BxK[0]
  lengths_B = jnp.full((b,), s, jnp.int32)
  if method not in ATTENTION_POLICIES:
    observed_BxKxS = jnp.zeros((*shape_BxK, s), jnp.float32)
  else:
    q_pos_BxS = jnp.broadcast_to(jnp.arange(s), (b, s))
    observed_BxKxS = observed_attention(method, probs_BxKxSxS, q_pos_BxS, lengths_B)
  score_BxKxS = key_scores(method, observed_BxKxS, lengths_B, rng)
  return keep_top(score_BxKxS, jnp.full((b,), n, jnp.int32))


def evicted_prefill(model: nn.Module, params, tokens_BxS: jax.Array, method: str, n: int,
                    room: int, rng: jax.Array) -> tuple[jax.Array, CompactKVCache]:
  """Prefill of whole (unpadded) prompts, then `method` keeps `n` tokens per (layer, K/V head):
  returns the prompts' logits and a compacted cache with `room` rows for later tokens."""
  b, s = tokens_BxS.shape
  if not 0 < n <= s:
    raise ValueError(f"keep count must be in 1..{s} (the prompt length), got {n}")
  cache = init_eviction_cache(model.cfg, b, s, policy=method, rng=rng)
  positions_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  logits, cache = apply_with_cache(model, params, tokens_BxS, positions_BxS, cache)
  return logits, cache.compact(room, jnp.full((b,), n, jnp.int32))
