"""Attention-Gate: masked forward == prefill with eviction + decode, per-head flags, compacted
cache bytes, the eviction loss, eviction policies keeping exactly their count, config errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import kvjax
from kvjax import registry
from kvjax.cache.compact import EMPTY, compact_layout, keep_counts, keep_top
from kvjax.cache.sequence import CausalLayout, visible_flags
from kvjax.cache.storage import PlainStorage
from kvjax.decode import init_cache, prefill_cache
from kvjax.errors import ConfigError
from kvjax.eviction.policies import POLICIES, attention_probs, key_scores, observed_attention
from kvjax.cache.sequence import MaskedLayout
from kvjax.gate.layer import BIAS_STEP, AttentionGate
from kvjax.layers.cache import Chunk, KVCache
from kvjax.layers.dot_product import causal_mask, dot_product_attention
from kvjax.training.loss import next_token_loss
from tests.helpers import kept_counts, random_tokens, tiny_model

GATE = ("model.attention_gate.enable=true", "model.attention_gate.num_heads=2",
        "model.attention_gate.head_dim=8", "model.attention_gate.num_sinks=2")


def set_score_bias(params, bias_K):
  """Every gate's per-head score bias set to `bias_K` (decides the flags outright when large;
  the token parts spread ~1 around it)."""
  flat = traverse_util.flatten_dict(params)
  for path in flat:
    if "filter" in path and path[-1] == "bias":
      flat[path] = jnp.asarray(bias_K, jnp.float32) / BIAS_STEP
  return traverse_util.unflatten_dict(flat)


@functools.partial(jax.jit, static_argnums=0)
def run(model, params, tokens_BxT, positions_BxT=None, cache=None):
  """The model applied under jit (eager dispatch of the cache updates is slow)."""
  if cache is None:
    return model.apply({"params": params}, tokens_BxT)
  return model.apply({"params": params}, tokens_BxT, positions=positions_BxT, cache=cache)


def queries_at(q_pos_BxT):
  """The chunk a compacted layout's `attend` reads: only the queries' positions (its K/V were
  written already)."""
  return Chunk(k=None, v=None, positions=q_pos_BxT)


def gated(*overrides, bias=(-0.3, 0.3)):
  cfg, model, params = tiny_model(*GATE, *overrides)
  return cfg.model, model, set_score_bias(params, bias)


def incremental(model, params, cfg, tokens_BxT, prompt_len, prefill_chunk=None):
  """Prefill `prompt_len` tokens into the compacted cache (in chunks of `prefill_chunk`), then
  one token per step."""
  b, t = tokens_BxT.shape
  cache = init_cache(cfg, b, t)
  outs, step = [], prefill_chunk or prompt_len
  for i in range(0, prompt_len, step):
    j = min(i + step, prompt_len)
    logits, cache = run(model, params, tokens_BxT[:, i:j],
                        jnp.broadcast_to(jnp.arange(i, j), (b, j - i)), cache)
    outs.append(logits)
  cache = cache.finish_prefill(t - prompt_len, jax.random.key(0))
  for i in range(prompt_len, t):
    logits, cache = run(model, params, tokens_BxT[:, i:i + 1], jnp.full((b, 1), i), cache)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("sharing", ["model.num_kv_heads=2", "model.num_kv_heads=1",
                                     "model.kv_sharing.factor=2"], ids=["gqa", "mqa", "cla2"])
def test_masked_forward_equals_prefill_with_eviction_and_decode(sharing):
  cfg, model, params = gated(sharing, "model.attention_gate.gate_decode=true",
                             bias=(-0.3,) * (1 if "=1" in sharing else 2))
  tokens = random_tokens(2, 20, seed=3)
  full = run(model, params, tokens)
  inc, cache = incremental(model, params, cfg, tokens, prompt_len=9)
  np.testing.assert_allclose(inc, full, atol=2e-5, rtol=2e-5)
  kept = kept_counts(cache)
  assert (kept < 20).all() and (kept >= 2).all()  # evictions happened, sinks stayed


@pytest.mark.parametrize("prefill_chunk", [None, 4], ids=["whole", "chunked"])
def test_recent_window_masked_forward_equals_prefill_and_decode(prefill_chunk):
  recent = "model.attention_gate.recent_tokens=3"
  cfg, model, params = gated("model.attention_gate.gate_decode=true", recent, bias=(-1.0, 0.3))
  tokens = random_tokens(2, 20, seed=3)
  full = run(model, params, tokens)
  inc, cache = incremental(model, params, cfg, tokens, prompt_len=9, prefill_chunk=prefill_chunk)
  np.testing.assert_allclose(inc, full, atol=2e-5, rtol=2e-5)
  _, without, _ = gated("model.attention_gate.gate_decode=true", bias=(-1.0, 0.3))
  assert np.abs(run(without, params, tokens) - full).max() > 1e-3  # the window mattered
  kept = kept_counts(cache)
  assert (kept < 20).all() and (kept >= 2).all()  # evictions happened, sinks stayed


def test_without_gating_on_write_decoded_tokens_are_all_appended():
  cfg, model, params = gated()
  tokens = random_tokens(2, 16, seed=4)
  b, t, p = 2, 16, 10
  cache = init_cache(cfg, b, t)
  pos = jnp.broadcast_to(jnp.arange(p), (b, p))
  _, cache = run(model, params, tokens[:, :p], pos, cache)
  cache = cache.finish_prefill(t - p, jax.random.key(0))
  before = kept_counts(cache)
  assert (before < p).any()
  for i in range(p, t):
    _, cache = run(model, params, tokens[:, i:i + 1], jnp.full((b, 1), i), cache)
  np.testing.assert_array_equal(kept_counts(cache), before + (t - p))


def test_flags_are_per_kv_head():
  # Head 0 keeps everything, head 1 only its 2 sinks; query heads 0-1 read head 0.
  cfg, model, params = gated(bias=(30.0, -30.0))
  tokens = random_tokens(1, 12, seed=5)
  cache = init_cache(cfg, 1, 12)
  _, cache = run(model, params, tokens, jnp.arange(12)[None], cache)
  np.testing.assert_array_equal(kept_counts(cache)[:, 0], [[12, 2]] * cfg.num_layers)
  # The gate changes only the heads it evicts for: head 0's queries see all 12 tokens.
  layer = cache.layers[0]
  q = jax.random.normal(jax.random.key(0), (1, 1, cfg.num_heads, cfg.head_dim_))
  q_pos = jnp.full((1, 1), 11)
  dense_out = dot_product_attention(q[:, :, :2], layer.k[:, :12, None], layer.v[:, :12, None],
                                    causal_mask(q_pos, jnp.arange(12)[None]))
  np.testing.assert_allclose(layer.attend(q, queries_at(q_pos))[0][:, :, :2], dense_out,
                             atol=1e-6)


def test_compacted_cache_bytes_are_kept_entries_times_entry_size():
  cfg, model, params = gated()
  tokens = random_tokens(1, 24, seed=6)
  cache = init_cache(cfg, 1, 24)
  _, cache = run(model, params, tokens, jnp.arange(24)[None], cache)
  full_bytes = cache.nbytes
  cache = cache.finish_prefill(0, jax.random.key(0))
  kept = int(kept_counts(cache).sum())
  entry = 2 * cfg.head_dim_ * 4 + 4  # K and V rows in float32, and the row's int32 position
  g = cfg.attention_gate  # while the prompt goes in, the gate keeps its own float32 K/V
  gate_entry = 2 * g.num_heads * g.head_dim * 4
  assert kept < cfg.num_kv_layers * cfg.num_kv_heads * 24
  assert cache.nbytes == kept * entry
  assert full_bytes == cfg.num_kv_layers * 24 * (cfg.num_kv_heads * entry + gate_entry)


@pytest.mark.parametrize("recent", [0, 3])
def test_generate_matches_greedy_teacher_forcing_with_ragged_prompts(recent):
  cfg, model, params = gated("model.attention_gate.gate_decode=true",
                             f"model.attention_gate.recent_tokens={recent}")
  lengths = np.array([11, 7])
  prompts = np.array(random_tokens(2, 11, seed=7))
  prompts[1, 7:] = 0
  out = kvjax.decode.generate(model, params, prompts, lengths, max_new_tokens=6,
                              rng=jax.random.key(0), cache=init_cache(cfg, 2, 17))
  for b in range(2):
    seq = np.concatenate([prompts[b, :lengths[b]], np.asarray(out.tokens[b])])
    logits = run(model, params, jnp.asarray(seq[None, :-1]))
    np.testing.assert_array_equal(np.argmax(logits[0, lengths[b] - 1:], -1), out.tokens[b])


def test_eviction_loss_moves_every_heads_kept_fraction_to_the_target():
  cfg, model, params = tiny_model(*GATE, "model.attention_gate.keep_ratio=0.6",
                                  "model.attention_gate.loss_weight=10.0")
  gate = {p: x for p, x in traverse_util.flatten_dict(params).items() if "filter" in p}
  frozen = {p: x for p, x in traverse_util.flatten_dict(params).items() if "filter" not in p}
  merge = lambda g: traverse_util.unflatten_dict({**frozen, **g})
  opt = optax.adam(3e-3)
  tokens = random_tokens(4, 33, seed=8)

  @jax.jit
  def step(g, state):
    (loss, metrics), grads = jax.value_and_grad(
        lambda g: next_token_loss(model, merge(g), tokens, None), has_aux=True)(g)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(g, updates), state, metrics

  state = opt.init(gate)
  _, _, first = step(gate, state)
  for _ in range(80):
    gate, state, metrics = step(gate, state)
  kept = {k: 1 - np.asarray(v) for k, v in metrics.items() if k.endswith("evict_ratio")}
  assert set(kept) == {f"layer_{i}/attn/filter/evict_ratio" for i in range(cfg.model.num_layers)}
  assert all(np.asarray(first[k]).max() < 0.05 for k in kept)  # starts keeping everything
  for k, v in kept.items():  # every head, not only the layer's mean (no all-or-nothing heads)
    assert v.shape == (cfg.model.num_kv_heads,)
    assert np.abs(v - 0.6).max() < 0.1, (k, v)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_keeps_exactly_the_requested_count(policy):
  q = jax.random.normal(jax.random.key(1), (2, 40, 4, 8))
  k = jax.random.normal(jax.random.key(2), (2, 40, 2, 8))
  pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
  lengths = jnp.array([40, 40])
  probs = attention_probs(q, k, pos, pos)
  observed = (observed_attention(policy, probs, pos, lengths) if policy in ("h2o", "tova", "snapkv")
              else jnp.zeros((2, 2, 40)))
  for ratio, n in ((0.01, 1), (7 / 40, 7), (1.0, 40)):
    counts = keep_counts(ratio, lengths)
    keep = keep_top(key_scores(policy, observed, lengths, jax.random.key(3)), counts)
    assert keep.shape == (2, 40, 2)
    np.testing.assert_array_equal(keep.sum(axis=1), n)


@pytest.mark.parametrize("policy", ["streaming_llm", "snapkv"])
def test_policy_cache_keeps_the_count_and_decodes(policy):
  cfg, model, params = tiny_model("model.kv_sharing.factor=2", f"model.eviction.policy={policy}",
                                  f"model.eviction.keep_ratio={10 / 36}")
  tokens = random_tokens(2, 40, seed=9)
  cache, _, _ = kvjax.decode.prefill_cache(model, params, tokens[:, :36], [36, 36],
                                           init_cache(cfg.model, 2, 40))
  cache = cache.finish_prefill(4, jax.random.key(0))
  np.testing.assert_array_equal(kept_counts(cache), 10)
  logits, cache = run(model, params, tokens[:, 36:], jnp.broadcast_to(jnp.arange(36, 40), (2, 4)),
                      cache)
  assert np.isfinite(np.asarray(logits)).all()
  np.testing.assert_array_equal(kept_counts(cache), 14)
  if policy == "streaming_llm":  # sinks and the most recent tokens, in position order
    pos = np.asarray(cache.layers[0].pos[0, :14])
    np.testing.assert_array_equal(pos, [0, 1, 2, 3, *range(30, 40)])


def test_compacted_attention_equals_dense_attention_under_the_keep_mask():
  cfg, _, _ = gated()
  b, s, kh = 2, 30, cfg.num_kv_heads
  k, v = (jax.random.normal(jax.random.key(i), (b, s, kh, cfg.head_dim_)) for i in (1, 2))
  keep = jax.random.bernoulli(jax.random.key(3), 0.4, (b, s, kh))
  pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  layer = compact_layout(b, s, kh, cfg.head_dim_, PlainStorage()).write(Chunk(k, v, pos, keep))
  q = jax.random.normal(jax.random.key(4), (b, 5, cfg.num_heads, cfg.head_dim_))
  q_pos = pos[:, [0, 7, 8, 20, 29]]
  causal_BxTxS = causal_mask(q_pos, pos)
  self_BxTxS = pos[:, None, :] == q_pos[:, :, None]
  mask_BxKxTxS = causal_BxTxS[:, None] & (jnp.moveaxis(keep, 2, 1)[:, :, None] | self_BxTxS[:, None])
  np.testing.assert_allclose(layer.attend(q, queries_at(q_pos))[0],
                             dot_product_attention(q, k, v, mask_BxKxTxS), atol=1e-6)


def np_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, shown_BxKxTxS):
  """Softmax attention over the shown keys in NumPy (float64): the reference for keep flags."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_BxTxHxD, k_BxSxKxD, v_BxSxKxD))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  shown_BxHxTxS = np.repeat(np.asarray(shown_BxKxTxS), g, axis=1)
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(shown_BxHxTxS, logits, -np.inf)
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return np.einsum("bhts,bshd->bthd", e / e.sum(axis=-1, keepdims=True), v)


def flagged_case(t, seed=0):
  """Random q, k, v (2 K/V heads of 2 query heads), the causal mask of the last `t` of 12
  queries, and random 0/1 flags with each query's own key shown."""
  b, s, d = 2, 12, 8
  q, k, v = (jax.random.normal(jax.random.key(seed + i), (b, n, h, d))
             for i, (n, h) in enumerate([(t, 4), (s, 2), (s, 2)]))
  q_pos = jnp.broadcast_to(jnp.arange(s - t, s), (b, t))
  causal_BxTxS = causal_mask(q_pos, jnp.broadcast_to(jnp.arange(s), (b, s)))
  own_BxTxS = jnp.arange(s)[None, None] == q_pos[:, :, None]
  flags = jax.random.bernoulli(jax.random.key(seed + 3), 0.4, (b, 2, t, s)) | own_BxTxS[:, None]
  return q, k, v, causal_BxTxS, flags.astype(jnp.float32)


@pytest.mark.parametrize("t", [12, 1], ids=["prefill", "one_query"])
def test_keep_flags_give_the_masked_softmax(t):
  q, k, v, causal_BxTxS, flags = flagged_case(t)
  out = dot_product_attention(q, k, v, causal_BxTxS, flags)
  np.testing.assert_allclose(out, np_attention(q, k, v, causal_BxTxS[:, None] & (flags > 0.5)),
                             atol=1e-5)


def test_a_hidden_keys_flag_gets_what_showing_it_would_change():
  # Per query: the change of `out . w` if that key alone were shown too, a difference of two
  # masked softmaxes (bounded whatever mass the hidden keys held).
  q, k, v, causal_BxTxS, flags = flagged_case(12, seed=5)
  w = np.asarray(jax.random.normal(jax.random.key(9), q.shape), np.float64)
  grad = jax.grad(lambda f: (dot_product_attention(q, k, v, causal_BxTxS, f) * w).sum())(flags)
  shown = np.asarray(causal_BxTxS[:, None] & (flags > 0.5))
  loss_BxT = lambda shown: (np_attention(q, k, v, shown) * w).sum(axis=(2, 3))
  checked = 0
  for bi, ki, ti, si in zip(*np.nonzero(np.asarray(causal_BxTxS[:, None]) & ~shown)):
    more = shown.copy()
    more[bi, ki, ti, si] = True
    expected = loss_BxT(more)[bi, ti] - loss_BxT(shown)[bi, ti]
    np.testing.assert_allclose(grad[bi, ki, ti, si], expected, atol=1e-4)
    checked += 1
  assert checked > 20


def np_recent_mask(causal_BxTxS, flags_BxKxTxS, q_pos_BxT, k_pos_BxS, recent):
  """The keys a query sees: causal, and flagged or at most `recent` positions before it."""
  distance_BxTxS = np.asarray(q_pos_BxT)[:, :, None] - np.asarray(k_pos_BxS)[:, None, :]
  near_BxTxS = (distance_BxTxS >= 0) & (distance_BxTxS <= recent)
  return np.asarray(causal_BxTxS)[:, None] & (np.asarray(flags_BxKxTxS) | near_BxTxS[:, None])


@pytest.mark.parametrize("layout", ["sequence", "compacted"])
def test_keys_within_the_recent_window_are_visible_whatever_their_flags(layout):
  b, s, kh, r = 2, 30, 2, 4
  k, v = (jax.random.normal(jax.random.key(i), (b, s, kh, 8)) for i in (1, 2))
  keep = jax.random.bernoulli(jax.random.key(3), 0.3, (b, s, kh))
  pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  if layout == "sequence":
    q = jax.random.normal(jax.random.key(4), (b, s, 4, 8))
    q_pos = pos
    out = CausalLayout(recent=r).attend(q, Chunk(k, v, pos, keep.astype(jnp.float32)))[0]
  else:
    q = jax.random.normal(jax.random.key(4), (b, 5, 4, 8))
    q_pos = pos[:, [0, 7, 8, 20, 29]]
    layer = compact_layout(b, s, kh, 8, PlainStorage(), recent=r).write(Chunk(k, v, pos, keep))
    out = layer.attend(q, queries_at(q_pos))[0]
  flags_BxKxTxS = np.broadcast_to(np.moveaxis(np.asarray(keep), 2, 1)[:, :, None],
                                  (b, kh, q_pos.shape[1], s))
  shown = np_recent_mask(causal_mask(q_pos, pos), flags_BxKxTxS, q_pos, pos, r)
  np.testing.assert_allclose(out, np_attention(q, k, v, shown), atol=1e-5)
  np.testing.assert_allclose(dot_product_attention(q, k, v, causal_mask(q_pos, pos),
                                                   visible_flags(keep, q_pos, pos, r)),
                             np_attention(q, k, v, shown), atol=1e-5)


@pytest.mark.parametrize("recent", [0, 3])
def test_compacted_cache_pallas_decode_matches_xla(recent):
  cfg, model, params = gated("model.attention_impl=pallas",
                             f"model.attention_gate.recent_tokens={recent}")
  tokens = random_tokens(1, 60, seed=11)
  cache = init_cache(cfg, 1, 64)
  _, cache = run(model, params, tokens, jnp.arange(60)[None], cache)
  cache = cache.finish_prefill(2, jax.random.key(0))
  layer = cache.layers[0]
  assert layer.impl == "pallas" and all(s % 64 == 0 for s in layer.heads.sizes)
  q = jax.random.normal(jax.random.key(0), (1, 1, cfg.num_heads, cfg.head_dim_))
  k, v = (jax.random.normal(jax.random.key(i), (1, 1, cfg.num_kv_heads, cfg.head_dim_))
          for i in (1, 2))
  layer = layer.write(Chunk(k, v, jnp.full((1, 1), 60)))
  at_60 = queries_at(jnp.full((1, 1), 60))
  np.testing.assert_allclose(layer.attend(q, at_60)[0],
                             layer.replace(impl="xla").attend(q, at_60)[0], atol=1e-5)
  assert int(((layer.pos >= 0) & (layer.pos < EMPTY)).sum()) == kept_counts(cache)[0].sum() + 2


@pytest.mark.parametrize("override, message", [
    ("model.attention_gate.threshold=1.5", "model.attention_gate.threshold"),
    ("model.attention_gate.keep_ratio=0", "model.attention_gate.keep_ratio"),
    ("model.attention_gate.recent_tokens=-1", "model.attention_gate.recent_tokens"),
    ("model.attention_gate.recent_tokens=512", "model.attention_gate.recent_tokens"),
    ("model.attention_gate.heads=2", "model.attention_gate.heads"),
    ("train.freeze_base=true", "train.freeze_base"),
    ("model.attention_gate.protocol=after", "model.attention_gate.protocol"),
    ("model.attention_gate.gate_decode=true model.attention_gate.protocol=compaction",
     "model.attention_gate.gate_decode"),
])
def test_bad_gate_config_is_one_clear_error(override, message):
  with pytest.raises(ConfigError, match=message):
    kvjax.load_config(None, override.split())


def masked(shown_LxBxKxTxT) -> KVCache:
  """Every layer's attention under its own mask; keep flags are not applied."""
  return KVCache(layers=tuple(map(MaskedLayout, jnp.asarray(shown_LxBxKxTxT))),
                 max_len=shown_LxBxKxTxT.shape[-1])


def dense_gate_scores(model, params, tokens_BxT, layers: int) -> np.ndarray:
  """`[L, B, T, K]`: every gate's score in a dense forward of the tokens (no flag applied)."""
  b, t = tokens_BxT.shape
  causal = np.broadcast_to(np.tri(t, dtype=bool), (layers, b, t, t))
  _, state = model.apply({"params": params}, tokens_BxT, jnp.broadcast_to(jnp.arange(t), (b, t)),
                         masked(causal), mutable=["intermediates"],
                         capture_intermediates=lambda m, _: isinstance(m, AttentionGate))
  calls = [v for path, v in traverse_util.flatten_dict(state["intermediates"]).items()
           if "filter" in path]
  return np.stack([np.asarray(call[0][1]) for call in calls])


@pytest.mark.parametrize("prefill_chunk", [None, 5], ids=["whole", "chunked"])
def test_compaction_keeps_the_best_scored_tokens_then_decodes_as_the_masked_forward(
    prefill_chunk):
  b, t, p, recent = 2, 20, 12, 2
  cfg, model, params = gated("model.attention_gate.protocol=compaction", "model.num_layers=2",
                             "model.attention_gate.keep_ratio=0.5",
                             f"model.attention_gate.recent_tokens={recent}")
  tokens = random_tokens(b, t, seed=5)
  n = round(0.5 * p)
  score_LxBxPxK = dense_gate_scores(model, params, tokens[:, :p], layers=2)
  score_LxBxPxK[:, :, p - recent:] = np.inf
  order = np.argsort(-score_LxBxPxK, axis=2, kind="stable")
  kept_LxBxPxK = np.zeros_like(score_LxBxPxK, bool)
  np.put_along_axis(kept_LxBxPxK, order[:, :, :n], True, axis=2)
  assert kept_LxBxPxK[:, :, :2].all()  # the sinks
  q, k = np.arange(t)[:, None], np.arange(t)[None, :]
  shown_LxBxKxTxT = (k <= q) & ((q < p) | (k >= p) | np.pad(
      np.moveaxis(kept_LxBxPxK, 3, 2), [(0, 0)] * 3 + [(0, t - p)])[..., None, :])
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  want = run(model, params, tokens, positions, masked(shown_LxBxKxTxT))[0]
  dense = run(model, params, tokens, positions, masked(np.broadcast_to(k <= q, (2, b, t, t))))
  cache, _, prompt_logits = prefill_cache(model, params, tokens[:, :p], np.full(b, p),
                                          init_cache(cfg, b, t), chunk=prefill_chunk,
                                          keep_logits=True)
  cache = cache.finish_prefill(t - p, jax.random.key(0))
  got = [prompt_logits]
  for i in range(p, t):
    logits, cache = run(model, params, tokens[:, i:i + 1], jnp.full((b, 1), i), cache)
    got.append(logits)
  got = jnp.concatenate(got, axis=1)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(kept_counts(cache), n + t - p)
  assert np.abs(got - dense[0]).max() > 1e-3  # the eviction mattered


def test_compaction_is_tagged_and_not_scored_by_a_forward_pass():
  cfg = kvjax.load_config(None, [*GATE, "model.attention_gate.protocol=compaction"]).model
  assert registry.method_tag(cfg).endswith("/gate/compaction")
  assert "dense prefill" in registry.sequence_gap(cfg)
  assert registry.sequence_gap(kvjax.load_config(None, list(GATE)).model) is None
