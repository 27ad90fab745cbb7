"""Eviction as a cache setting (`model.eviction`): exact keep counts through prefill and decode,
cache bytes, keep_ratio 1 == dense, pads and chunking do not change the choice, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.config import ConfigError
from kvjax.decode import SamplingConfig, decode_loop, generate, init_cache, prefill
from kvjax.decode.eviction import EvictionCache
from kvjax.decode.generate import after_prefill
from kvjax.decode.throughput import method_name
from kvjax.eval.scoring import prefill_chunks
from tests.helpers import random_tokens, tiny_model

GREEDY = SamplingConfig()


def evicting(policy, ratio=0.5, *overrides):
  return tiny_model(f"model.eviction.policy={policy}", f"model.eviction.keep_ratio={ratio}",
                    *overrides)


def prefilled(model, params, cfg, prompts_BxT, lengths, max_new):
  cache = init_cache(cfg, prompts_BxT.shape[0], prompts_BxT.shape[1] + max_new)
  state = prefill(model, params, prompts_BxT, jnp.asarray(lengths, jnp.int32), cache,
                  jax.random.key(0), sampling=GREEDY, max_new_tokens=max_new)
  return after_prefill(state, max_new)


def kept_positions(cache):
  """Per layer, sequence and head, the sorted positions a compacted cache holds."""
  out = []
  for layer in cache.layers:
    pos = np.asarray(layer.pos)
    offsets = np.concatenate([[0], np.cumsum(layer.sizes)])
    out.append([[sorted(p for p in pos[b, offsets[h]:offsets[h + 1]] if 0 <= p < 2**30)
                 for h in range(len(layer.sizes))] for b in range(pos.shape[0])])
  return out


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "streaming_llm"])
def test_keeps_exactly_the_count_through_generate(policy):
  cfg, model, params = evicting(policy, 0.4, "model.kv_sharing.factor=2")
  lengths = [30, 21]  # right-padded: each sequence keeps round(0.4 * its own length)
  state = prefilled(model, params, cfg.model, random_tokens(2, 30, seed=1), lengths, max_new=6)
  want = np.array([round(0.4 * n) for n in lengths])
  np.testing.assert_array_equal(state.cache.kept_counts(), np.broadcast_to(
      want[None, :, None], state.cache.kept_counts().shape))
  for b, n in enumerate(lengths):  # no pad survives
    assert all(p < n for layer in kept_positions(state.cache) for p in sum(layer[b], []))
  state = decode_loop(model, params, state, sampling=GREEDY)
  np.testing.assert_array_equal(state.cache.kept_counts(), np.broadcast_to(
      (want + 5)[None, :, None], state.cache.kept_counts().shape))


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
    cache = init_cache(cfg.model, 1, 50).with_prompt_lengths(jnp.asarray([37]))
    for _, _, cache in prefill_chunks(model, params, prompt, cache, chunk):
      pass
    assert isinstance(cache, EvictionCache)
    return kept_positions(cache.after_prefill(2))

  whole = choose(tokens, 64)
  assert choose(padded, 64) == whole
  assert choose(padded, 8) == whole
  assert all(len(h) == round(0.3 * 37) for layer in whole for seq in layer for h in seq)


def test_h2o_keeps_the_keys_with_the_most_attention_per_query():
  """An independent reference: the full causal attention of every layer, from a dense forward."""
  from kvjax.gate.baselines import attention_probs  # noqa: PLC0415

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
    probs = np.asarray(attention_probs(q, k))[0]  # K x S x S
    score = probs.sum(axis=1) / (20 - np.arange(20))
    want = [sorted(np.argsort(-s, kind="stable")[:10].tolist()) for s in score]
    assert got[0] == want


@pytest.mark.parametrize("overrides, key", [
    (["model.eviction.policy=lru"], "model.eviction.policy"),
    (["model.eviction.policy=h2o", "model.eviction.keep_ratio=0"], "model.eviction.keep_ratio"),
    (["model.eviction.policy=h2o", "model.eviction.keep_ratio=1.5"], "model.eviction.keep_ratio"),
    (["model.eviction.policy=h2o", "model.attention_gate.enable=true"], "model.eviction.policy"),
    (["model.eviction.policy=h2o", "model.kind=block_transformer"], "model.eviction.policy"),
])
def test_config_errors_name_the_key(overrides, key):
  with pytest.raises(ConfigError, match=key):
    kvjax.load_config(None, overrides)


def test_eviction_and_moa_plan_are_exclusive(tmp_path):
  plan = tmp_path / "plan.json"
  plan.write_text('{"alphas": [[0, 0, 0, 0], [0, 0, 0, 0]], "betas": [[1, 1, 1, 1], [1, 1, 1, 1]]}')
  with pytest.raises(ConfigError, match="model.eviction.policy.*moa_plan"):
    tiny_model("model.eviction.policy=h2o", f"model.moa_plan={plan}")


def test_eval_chunked_generation_equals_generate():
  """The eval's generation path (chunked prefill, right-padded prompts) evicts like `generate`."""
  from kvjax.eval.long_context import _chunked_generate  # noqa: PLC0415

  cfg, model, params = evicting("h2o", 0.3)
  params = jax.tree.map(lambda x: 6 * x, params)  # sharp attention: tokens depend on the cache
  prompts = np.asarray(random_tokens(2, 30, seed=7))
  lengths = np.array([30, 19], np.int32)
  kw = dict(max_new_tokens=8, rng=jax.random.key(0))
  want = generate(model, params, prompts, lengths, cache=init_cache(cfg.model, 2, 38), **kw)
  dense = generate(model, params, prompts, lengths, cache=init_cache(tiny_model()[0].model, 2, 38),
                   **kw)
  got = _chunked_generate(model, params, cfg.model, prompts, lengths, max_new_tokens=8,
                          eos_id=None, pad_id=0, chunk=8)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  assert (np.asarray(got.tokens) != np.asarray(dense.tokens)).any()


def test_decode_reports_the_policy_in_the_method_tag():
  cfg = kvjax.load_config(None, ["model.eviction.policy=h2o", "model.eviction.keep_ratio=0.25"])
  assert method_name(cfg.model) == "llama/mha/h2o@0.25"
