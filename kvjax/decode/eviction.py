"""Score-based K/V eviction as a cache setting (`model.eviction`): the prompt is prefilled densely,
then every (sequence, layer, K/V head) keeps exactly round(keep_ratio * prompt length) of its
prompt tokens, chosen by the policy, in the compacted cache of `kvjax.decode.compact_cache`;
decoded tokens are appended. Policies (definitions as in NVIDIA's kvpress):
- `streaming_llm`: 4 sink tokens and the most recent ones;
- `local_window`: the most recent tokens;
- `random`: a uniform random subset;
- `h2o`: attention received, summed over the queries that saw the token and divided by their
  number (so early tokens are not favoured for being seen more often);
- `tova`: attention from the last query;
- `snapkv`: attention from an observation window of the last queries, average-pooled over
  neighbouring keys; the window itself is always kept.
Attention is averaged over the query heads of a K/V head and over the layers that read one
producer's K/V (cross-layer sharing).

Prefill may come in chunks: each chunk's queries are captured from the model (`apply_with_cache`)
and the attention they pay every key is accumulated per policy (`EvictionCache.observe`), so the
choice needs only prompt-length state. Right-padded prompts give their lengths
(`with_prompt_lengths`): pads are neither scored nor kept. `after_prefill` makes the choice.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from kvjax.config import ModelConfig
from kvjax.decode.cache import DenseLayerCache, tree_nbytes
from kvjax.decode.compact_cache import CompactKVCache, init_compact_cache
from kvjax.layers.attention import NEG_INF, causal_mask
from kvjax.layers.rope import apply_rope

POLICIES = ("streaming_llm", "local_window", "random", "h2o", "tova", "snapkv")
ATTENTION_POLICIES = ("h2o", "tova", "snapkv")
STREAMING_SINKS = 4
SNAPKV_WINDOW = 32
SNAPKV_KERNEL = 5


def attention_probs(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, q_pos_BxT: jax.Array,
                    k_pos_BxS: jax.Array) -> jax.Array:
  """Causal attention probabilities averaged over each K/V head's query heads: `[B, K, T, S]`."""
  b, t, h, d = q_BxTxHxD.shape
  k = k_BxSxKxD.shape[2]
  q_BxTxKxGxD = q_BxTxHxD.reshape(b, t, k, h // k, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  mask = causal_mask(q_pos_BxT, k_pos_BxS)[:, None, None]
  return jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1).mean(axis=2)


def query_weights(policy: str, q_pos_BxT: jax.Array, lengths_B: jax.Array) -> jax.Array:
  """`[B, T]` weight of each prompt query's attention in the policy's key score."""
  q = q_pos_BxT
  n = lengths_B[:, None]
  if policy == "h2o":
    return (q < n).astype(jnp.float32)
  if policy == "tova":
    return (q == n - 1).astype(jnp.float32)
  if policy == "snapkv":
    window = jnp.minimum(SNAPKV_WINDOW, n)
    return ((q >= n - window) & (q < n)) / window
  raise ValueError(f"policy {policy!r} does not read attention; allowed: "
                   f"{', '.join(ATTENTION_POLICIES)}")


def observed_attention(policy: str, probs_BxKxTxS: jax.Array, q_pos_BxT: jax.Array,
                       lengths_B: jax.Array) -> jax.Array:
  """`[B, K, S]`: the attention each key got from the queries the policy reads."""
  return jnp.einsum("bkts,bt->bks", probs_BxKxTxS, query_weights(policy, q_pos_BxT, lengths_B))


def key_scores(policy: str, observed_BxKxS: jax.Array, lengths_B: jax.Array,
               rng: jax.Array) -> jax.Array:
  """`[B, K, S]` per-key score, higher is kept; -inf past each prompt's end.
  `observed_BxKxS` (from `observed_attention`) is read by the attention policies only."""
  s = observed_BxKxS.shape[-1]
  pos_S = jnp.arange(s, dtype=jnp.float32)
  n_Bx1x1 = lengths_B[:, None, None]
  if policy == "streaming_llm":
    score = jnp.where(pos_S < STREAMING_SINKS, jnp.inf, pos_S)
  elif policy == "local_window":
    score = pos_S
  elif policy == "random":
    score = jax.random.uniform(rng, observed_BxKxS.shape)
  elif policy == "h2o":
    score = observed_BxKxS / jnp.maximum(n_Bx1x1 - pos_S, 1)
  elif policy == "tova":
    score = observed_BxKxS
  elif policy == "snapkv":
    valid = (pos_S < n_Bx1x1).astype(jnp.float32)
    pad = SNAPKV_KERNEL // 2
    pool = lambda x: nn.avg_pool(x.reshape(-1, s, 1), (SNAPKV_KERNEL,),
                                 padding=((pad, pad),)).reshape(x.shape)
    valid = jnp.broadcast_to(valid, observed_BxKxS.shape)
    pooled = pool(observed_BxKxS * valid) / jnp.maximum(pool(valid), 1e-30)
    score = jnp.where(pos_S >= n_Bx1x1 - jnp.minimum(SNAPKV_WINDOW, n_Bx1x1), jnp.inf, pooled)
  else:
    raise ValueError(f"unknown eviction policy {policy!r}; allowed: {', '.join(POLICIES)}")
  score_BxKxS = jnp.broadcast_to(score, observed_BxKxS.shape)
  return jnp.where(pos_S < n_Bx1x1, score_BxKxS, -jnp.inf)


def keep_top(score_BxKxS: jax.Array, counts_B: jax.Array) -> jax.Array:
  """`[B, S, K]` flags marking each sequence's `counts_B` best-scored keys per K/V head."""
  order_BxKxS = jnp.argsort(-score_BxKxS, axis=-1, stable=True)
  rank_BxKxS = jnp.argsort(order_BxKxS, axis=-1)
  return jnp.moveaxis(rank_BxKxS < counts_B[:, None, None], 1, 2)


def keep_counts(keep_ratio: float, lengths_B: jax.Array) -> jax.Array:
  """round(keep_ratio * prompt length), at least one token."""
  return jnp.maximum(jnp.round(keep_ratio * lengths_B), 1).astype(jnp.int32)


@flax.struct.dataclass
class EvictionLayerCache:
  """A dense prefill buffer and the attention its keys received so far."""

  dense: DenseLayerCache
  observed: jax.Array  # B x K x S float32

  @property
  def max_len(self) -> int:
    return self.dense.max_len

  def write(self, k_BxTxKxD, v_BxTxKxD, positions_BxT) -> EvictionLayerCache:
    return self.replace(dense=self.dense.write(k_BxTxKxD, v_BxTxKxD, positions_BxT))

  def attend(self, q_BxTxHxD, positions_BxT, impl: str = "auto", kv=None) -> jax.Array:
    return self.dense.attend(q_BxTxHxD, positions_BxT, impl, kv)


@flax.struct.dataclass
class EvictionCache:
  """The model's cache while a prompt is prefilled under `model.eviction`; `after_prefill`
  turns it into the compacted cache that decode uses."""

  layers: tuple  # one EvictionLayerCache per layer that owns K/V
  lengths: jax.Array  # B int32, prompt lengths
  rng: jax.Array  # for the random policy
  cfg: ModelConfig = flax.struct.field(pytree_node=False)
  policy: str = flax.struct.field(pytree_node=False)

  @property
  def max_len(self) -> int:
    return self.layers[0].max_len

  @property
  def nbytes(self) -> int:
    return tree_nbytes(self.layers)

  def with_prompt_lengths(self, prompt_lengths_B: jax.Array) -> EvictionCache:
    return self.replace(lengths=jnp.asarray(prompt_lengths_B, jnp.int32))

  def observe(self, queries: list[jax.Array], positions_BxT: jax.Array) -> EvictionCache:
    """Adds the attention of a chunk's queries (rotated, one `[B, T, H, D]` per model layer,
    written to the cache already) to every key's score."""
    if self.policy not in ATTENTION_POLICIES:
      return self
    readers = {}
    for i, p in enumerate(self.cfg.producer_of):
      readers.setdefault(p, []).append(queries[i])
    layers = []
    for layer, qs in zip(self.layers, (readers[p] for p in sorted(readers))):
      b, s = layer.dense.k.shape[:2]
      slots_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
      probs = sum(attention_probs(q, layer.dense.k, positions_BxT, slots_BxS) for q in qs) / len(qs)
      layers.append(layer.replace(observed=layer.observed + observed_attention(
          self.policy, probs, positions_BxT, self.lengths)))
    return self.replace(layers=tuple(layers))

  def compact(self, room: int, counts_B: jax.Array) -> CompactKVCache:
    """Keeps `counts_B` prompt tokens per (sequence, layer, K/V head) in a compacted cache with
    `room` more rows per head (host side: the sizes become static shapes)."""
    b, s = self.layers[0].dense.k.shape[:2]
    positions_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    fresh = init_compact_cache(self.cfg, b, s)
    layers = []
    for layer, target, key in zip(self.layers, fresh.layers,
                                  jax.random.split(self.rng, len(self.layers))):
      score = key_scores(self.policy, layer.observed, self.lengths, key)
      keep_BxSxK = keep_top(score, counts_B)
      layers.append(target.write(layer.dense.k, layer.dense.v, positions_BxS, keep_BxSxK))
    cache = CompactKVCache(layers=tuple(layers), max_len=s, gate_decode=False)
    return cache.after_prefill(room)

  def after_prefill(self, room: int) -> CompactKVCache:
    return self.compact(room, keep_counts(self.cfg.eviction.keep_ratio, self.lengths))


def init_eviction_cache(cfg: ModelConfig, batch: int, max_len: int, policy: str | None = None,
                        rng: jax.Array | None = None) -> EvictionCache:
  """A prefill cache for `batch` prompts of up to `max_len` positions (prompt and decoded
  tokens); `policy` defaults to `cfg.eviction.policy`."""
  policy = policy or cfg.eviction.policy
  if policy not in POLICIES:
    raise ValueError(f"unknown eviction policy {policy!r}; allowed: {', '.join(POLICIES)}")
  shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim_)
  dtype = jnp.dtype(cfg.cache_dtype)
  layers = tuple(EvictionLayerCache(
      dense=DenseLayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)),
      observed=jnp.zeros((batch, cfg.num_kv_heads, max_len), jnp.float32))
                 for _ in range(cfg.num_kv_layers))
  return EvictionCache(layers=layers, lengths=jnp.full((batch,), max_len, jnp.int32),
                       rng=jax.random.key(0) if rng is None else rng, cfg=cfg, policy=policy)


def _is_query(module: nn.Module, _) -> bool:
  return module.name == "q" and module.parent is not None and module.parent.name == "attn"


def apply_with_cache(model: nn.Module, params, tokens_BxT: jax.Array, positions_BxT: jax.Array,
                     cache):
  """`model.apply` of a chunk with a cache: `(logits, cache)`. An `EvictionCache` whose policy
  reads attention also gets every layer's queries, to score its keys."""
  if not (isinstance(cache, EvictionCache) and cache.policy in ATTENTION_POLICIES):
    return model.apply({"params": params}, tokens_BxT, positions=positions_BxT, cache=cache)
  cfg: ModelConfig = model.cfg
  (logits, cache), state = model.apply({"params": params}, tokens_BxT, positions=positions_BxT,
                                       cache=cache, capture_intermediates=_is_query)
  inter = state["intermediates"]
  queries = [apply_rope(inter[f"layer_{i}"]["attn"]["q"]["__call__"][0], positions_BxT,
                        cfg.rope_theta) for i in range(cfg.num_layers)]
  return logits, cache.observe(queries, positions_BxT)
