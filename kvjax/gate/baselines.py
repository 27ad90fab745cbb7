"""Eviction baselines at a given keep count, on the same compacted cache as the gate.

Each picks exactly `n` of a prompt's `S` tokens per (sequence, layer, K/V head) after a full
prefill (definitions as in NVIDIA's kvpress):
- `streaming_llm`: 4 sink tokens and the most recent ones;
- `local_window`: the most recent tokens;
- `random`: a uniform random subset;
- `h2o`: attention received, summed over the queries that saw the token and divided by their
  number (so early tokens are not favoured for being seen more often);
- `tova`: attention from the last query;
- `snapkv`: attention from an observation window of the last queries, average-pooled over
  neighbouring keys; the window itself is always kept.
Attention scores are averaged over the query heads of a K/V head and over the layers that read
one producer's K/V (cross-layer sharing).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kvjax.config import ModelConfig
from kvjax.decode.compact_cache import CompactKVCache, init_compact_cache
from kvjax.layers.attention import NEG_INF, causal_mask
from kvjax.layers.rope import apply_rope

BASELINES = ("streaming_llm", "local_window", "random", "h2o", "tova", "snapkv")
STREAMING_SINKS = 4
SNAPKV_WINDOW = 32
SNAPKV_KERNEL = 5


def attention_probs(q_BxSxHxD: jax.Array, k_BxSxKxD: jax.Array) -> jax.Array:
  """Causal attention probabilities of a prompt, averaged over each K/V head's query heads:
  `[B, K, S_query, S_key]`."""
  b, s, h, d = q_BxSxHxD.shape
  k = k_BxSxKxD.shape[2]
  q_BxSxKxGxD = q_BxSxHxD.reshape(b, s, k, h // k, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q_BxSxKxGxD, k_BxSxKxD,
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  pos_BxS = jnp.broadcast_to(jnp.arange(s), (b, s))
  mask = causal_mask(pos_BxS, pos_BxS)[:, None, None]
  return jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1).mean(axis=2)


def scores(method: str, probs_BxKxSxS: jax.Array) -> jax.Array:
  """Per-key score `[B, K, S]` of an attention-based method; higher is kept."""
  s = probs_BxKxSxS.shape[-1]
  if method == "h2o":
    return probs_BxKxSxS.sum(axis=2) / (s - jnp.arange(s))
  if method == "tova":
    return probs_BxKxSxS[:, :, -1]
  if method == "snapkv":
    window = min(SNAPKV_WINDOW, s)
    observed = probs_BxKxSxS[:, :, -window:].mean(axis=2)
    pad = SNAPKV_KERNEL // 2
    pooled = nn.avg_pool(observed.reshape(-1, s, 1), (SNAPKV_KERNEL,), padding=((pad, pad),),
                         count_include_pad=False).reshape(observed.shape)
    return jnp.where(jnp.arange(s) >= s - window, jnp.inf, pooled)
  raise ValueError(f"unknown baseline {method!r}; allowed: {', '.join(BASELINES)}")


def baseline_keep(method: str, n: int, probs_BxKxSxS: jax.Array | None, shape_BxK: tuple,
                  s: int, rng: jax.Array) -> jax.Array:
  """`[B, S, K]` flags marking exactly `n` tokens per sequence and K/V head.

  `probs_BxKxSxS` (from `attention_probs`) is needed by the attention-based methods only.
  """
  if not 0 < n <= s:
    raise ValueError(f"keep count must be in 1..{s} (the prompt length), got {n}")
  pos_S = jnp.arange(s, dtype=jnp.float32)
  if method == "streaming_llm":
    score = jnp.where(pos_S < STREAMING_SINKS, jnp.inf, pos_S)
  elif method == "local_window":
    score = pos_S
  elif method == "random":
    score = jax.random.uniform(rng, (*shape_BxK, s))
  else:
    score = scores(method, probs_BxKxSxS)
  score_BxKxS = jnp.broadcast_to(score, (*shape_BxK, s))
  _, top_BxKxN = jax.lax.top_k(score_BxKxS, n)
  keep_BxKxS = jnp.zeros(score_BxKxS.shape, bool).at[
      jnp.arange(shape_BxK[0])[:, None, None], jnp.arange(shape_BxK[1])[None, :, None],
      top_BxKxN].set(True)
  return jnp.moveaxis(keep_BxKxS, 1, 2)


def prompt_qkv(model: nn.Module, params, tokens_BxS: jax.Array):
  """A dense forward pass over whole prompts: `(logits_BxSxV, [(qs, k, v) per K/V buffer])`,
  where `qs` are the rotated queries of every layer that reads that buffer."""
  cfg: ModelConfig = model.cfg
  b, s = tokens_BxS.shape
  positions_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  logits, state = model.apply(
      {"params": params}, tokens_BxS,
      capture_intermediates=lambda mdl, _: mdl.name in ("q", "kv") and mdl.parent.name == "attn")
  inter = state["intermediates"]
  groups = {}
  for i, p in enumerate(cfg.producer_of):  # a producer comes before the layers reading it
    attn = inter[f"layer_{i}"]["attn"]
    if p == i:
      groups[p] = ([], *attn["kv"]["__call__"][0][:2])
    groups[p][0].append(apply_rope(attn["q"]["__call__"][0], positions_BxS, cfg.rope_theta))
  return logits, [groups[p] for p in sorted(groups)]


def evicted_prefill(model: nn.Module, params, tokens_BxS: jax.Array, method: str, n: int,
                    room: int, rng: jax.Array) -> tuple[jax.Array, CompactKVCache]:
  """Prefill of whole (unpadded) prompts, then `method` keeps `n` tokens per (layer, K/V head):
  returns the prompts' logits and a compacted cache with `room` rows for later tokens."""
  cfg: ModelConfig = model.cfg
  b, s = tokens_BxS.shape
  logits, groups = prompt_qkv(model, params, tokens_BxS)
  positions_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  cache = init_compact_cache(cfg, b, s)
  layers = []
  for layer, (qs, k, v), key in zip(cache.layers, groups, jax.random.split(rng, len(groups))):
    probs = None
    if method not in ("streaming_llm", "local_window", "random"):
      probs = sum(attention_probs(q, k) for q in qs) / len(qs)
    keep = baseline_keep(method, n, probs, (b, cfg.num_kv_heads), s, key)
    layers.append(layer.write(k, v, positions_BxS, keep))
  cache = CompactKVCache(layers=tuple(layers), max_len=cfg.max_seq_len, gate_decode=False)
  return logits, cache.after_prefill(room)
