"""Eviction as a cache setting (`model.eviction`): exact keep counts through prefill and decode,
cache bytes, keep_ratio 1 == dense, pads and chunking do not change the choice, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import registry
from kvjax.decode import SamplingConfig, decode_loop, generate, init_cache, prefill, prefill_cache
from kvjax.errors import ConfigError
from kvjax.eviction.layout import EvictionLayout
from tests.helpers import kept_counts, random_tokens, tiny_model

GREEDY = SamplingConfig()


def evicting(policy, ratio=0.5, *overrides):
  return tiny_model(f"model.eviction.policy={policy}", f"model.eviction.keep_ratio={ratio}",
                    *overrides)


def prefilled(model, params, cfg, prompts_BxT, lengths, max_new):
  cache = init_cache(cfg, prompts_BxT.shape[0], prompts_BxT.shape[1] + max_new)
  return prefill(model, params, prompts_BxT, jnp.asarray(lengths, jnp.int32), cache,
                 jax.random.key(0), sampling=GREEDY, max_new_tokens=max_new)


def kept_positions(cache):
  """Per layer, sequence and head, the sorted positions a compacted cache holds."""
  out = []
  for layer in cache.layers:
    pos = np.asarray(layer.pos)
    offsets = np.concatenate([[0], np.cumsum(layer.heads.sizes)])
    out.append([[sorted(p for p in pos[b, offsets[h]:offsets[h + 1]] if 0 <= p < 2**30)
                 for h in range(len(layer.heads.sizes))] for b in range(pos.shape[0])])
  return out


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "streaming_llm"])
def test_keeps_exactly_the_count_through_generate(policy):
  cfg, model, params = evicting(policy, 0.4, "model.kv_sharing.factor=2")
  lengths = [30, 21]  # right-padded: each sequence keeps round(0.4 * its own length)
  state = prefilled(model, params, cfg.model, random_tokens(2, 30, seed=1), lengths, max_new=6)
  want = np.array([round(0.4 * n) for n in lengths])
  np.testing.assert_array_equal(kept_counts(state.cache), np.broadcast_to(
      want[None, :, None], kept_counts(state.cache).shape))
  for b, n in enumerate(lengths):  # no pad survives
    assert all(p < n for layer in kept_positions(state.cache) for p in sum(layer[b], []))
  state = decode_loop(model, params, state, sampling=GREEDY)
  np.testing.assert_array_equal(kept_counts(state.cache), np.broadcast_to(
      (want + 5)[None, :, None], kept_counts(state.cache).shape))


def test_kv_bytes_after_prefill_are_kept_tokens_times_entry_size():
  cfg, model, params = evicting("h2o", 0.25)
  m = cfg.model
  state = prefilled(model, params, m, random_tokens(1, 40, seed=2), [40], max_new=1)
  entry = 2 * m.head_dim_ * 4 + 4  # float32 K and V rows, and the int32 position of the row
  assert state.cache.nbytes == m.num_kv_layers * m.num_kv_heads * 10 * entry
  dense = init_cache(tiny_model()[0].model, 1, 40)
  assert dense.nbytes == m.num_kv_layers * m.num_kv_heads * 40 * 2 * m.head_dim_ * 4


@pytest.mark.parametrize("policy", ["h2o", "streaming_llm"])
def test_keep_ratio_one_generates_the_dense_tokens(policy):
  cfg, model, params = evicting(policy, 1.0)
  dense_cfg, _, _ = tiny_model()
  prompts = random_tokens(2, 24, seed=3)
  lengths = jnp.asarray([24, 17], jnp.int32)
  kw = dict(max_new_tokens=10, rng=jax.random.key(0))
  ours = generate(model, params, prompts, lengths, cache=init_cache(cfg.model, 2, 34), **kw)
  dense = generate(model, params, prompts, lengths, cache=init_cache(dense_cfg.model, 2, 34), **kw)
  np.testing.assert_array_equal(ours.tokens, dense.tokens)


@pytest.mark.parametrize("policy", ["h2o", "tova", "snapkv", "random"])
def test_pads_and_chunks_do_not_change_the_choice(policy):
  cfg, model, params = evicting(policy, 0.3)
  tokens = np.asarray(random_tokens(1, 37, seed=4))
  padded = np.concatenate([tokens, np.zeros((1, 11), np.int32)], axis=1)

  def choose(prompt, chunk):
    cache, _, _ = prefill_cache(model, params, prompt, [37], init_cache(cfg.model, 1, 50),
                                chunk=chunk)
    assert isinstance(cache.layers[0], EvictionLayout)
    return kept_positions(cache.finish_prefill(2, jax.random.key(0)))

  whole = choose(tokens, 64)
  assert choose(padded, 64) == whole
  assert choose(padded, 8) == whole
  assert all(len(h) == round(0.3 * 37) for layer in whole for seq in layer for h in seq)


def numpy_attention_probs(q_SxHxD, k_SxKxD):
  """Causal softmax attention in float64 NumPy, averaged over each K/V head's query heads:
  `[K, S, S]` (an oracle that shares no code with kvjax)."""
  s, h, d = q_SxHxD.shape
  kh = k_SxKxD.shape[1]
  q = np.asarray(q_SxHxD, np.float64).reshape(s, kh, h // kh, d)
  logits = np.einsum("tkgd,skd->kgts", q, np.asarray(k_SxKxD, np.float64)) / np.sqrt(d)
  logits = np.where(np.tril(np.ones((s, s), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return (p / p.sum(axis=-1, keepdims=True)).mean(axis=1)


def test_h2o_keeps_the_keys_with_the_most_attention_per_query():
  """An independent reference: the full causal attention of every layer, from a dense forward."""
  cfg, model, params = evicting("h2o", 0.5)
  tokens = random_tokens(1, 20, seed=5)
  state = prefilled(model, params, cfg.model, tokens, [20], max_new=1)
  _, inter = model.apply({"params": params}, tokens, capture_intermediates=True)
  from kvjax.layers.rope import apply_rope  # noqa: PLC0415
  pos = jnp.arange(20)[None]
  for i, got in enumerate(kept_positions(state.cache)):
    attn = inter["intermediates"][f"layer_{i}"]["attn"]
    q = apply_rope(attn["q"]["__call__"][0], pos, cfg.model.rope_theta)
    k = attn["kv"]["__call__"][0][0]
    probs = numpy_attention_probs(q[0], k[0])  # K x S x S
    score = probs.sum(axis=1) / (20 - np.arange(20))
    want = [sorted(np.argsort(-s, kind="stable")[:10].tolist()) for s in score]
    assert got[0] == want


@pytest.mark.parametrize("overrides, key", [
    (["model.eviction.policy=lru"], "model.eviction.policy"),
    (["model.eviction.policy=h2o", "model.eviction.keep_ratio=0"], "model.eviction.keep_ratio"),
    (["model.eviction.policy=h2o", "model.eviction.keep_ratio=1.5"], "model.eviction.keep_ratio"),
    (["model.eviction.policy=h2o", "model.attention_gate.enable=true"],
     "model.eviction.policy: cannot be combined with model.attention_gate.enable"),
    (["model.eviction.policy=h2o", "model.scan_layers=true"],
     "model.scan_layers: cannot be combined with model.eviction.policy"),
])
def test_config_errors_name_the_key(overrides, key):
  with pytest.raises(ConfigError, match=key):
    kvjax.load_config(None, overrides)


def test_eviction_and_moa_plan_are_exclusive(tmp_path):
  plan = tmp_path / "plan.json"
  plan.write_text('{"alphas": [[0, 0, 0, 0], [0, 0, 0, 0]], "betas": [[1, 1, 1, 1], [1, 1, 1, 1]]}')
  with pytest.raises(ConfigError, match="model.eviction.policy: cannot be combined with "
                                        "model.moa.plan"):
    tiny_model("model.eviction.policy=h2o", f"model.moa.plan={plan}")


def test_chunked_generation_equals_generate():
  """Chunked prefill (what the long-context eval uses) of right-padded prompts evicts like one
  write."""
  cfg, model, params = evicting("h2o", 0.3)
  params = jax.tree.map(lambda x: 6 * x, params)  # sharp attention: tokens depend on the cache
  prompts = np.asarray(random_tokens(2, 30, seed=7))
  lengths = np.array([30, 19], np.int32)
  kw = dict(max_new_tokens=8, rng=jax.random.key(0))
  want = generate(model, params, prompts, lengths, cache=init_cache(cfg.model, 2, 38), **kw)
  dense = generate(model, params, prompts, lengths, cache=init_cache(tiny_model()[0].model, 2, 38),
                   **kw)
  got = generate(model, params, prompts, lengths, cache=init_cache(cfg.model, 2, 38), chunk=8,
                 **kw)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  assert (np.asarray(got.tokens) != np.asarray(dense.tokens)).any()


def test_decode_reports_the_policy_in_the_method_tag():
  cfg = kvjax.load_config(None, ["model.eviction.policy=h2o", "model.eviction.keep_ratio=0.25"])
  assert registry.method_tag(cfg.model) == "llama/mha/h2o@0.25"
