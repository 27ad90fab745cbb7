"""Eviction as a cache setting (`model.eviction`): exact keep counts through prefill and decode,
cache bytes, keep_ratio 1 == dense, pads and chunking do not change the choice, config errors;
in-context eviction against a sequential NumPy cache and a masked forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import registry
from kvjax.cache.sequence import MaskedLayout
from kvjax.cache.storage import PlainStorage
from kvjax.decode import SamplingConfig, decode_loop, generate, init_cache, prefill, prefill_cache
from kvjax.errors import ConfigError
from kvjax.eviction.in_context import IN_CONTEXT_POLICIES, random_scores
from kvjax.eviction.layout import EvictionLayout, eviction_layout
from kvjax.eviction.policies import STREAMING_SINKS
from kvjax.layers.cache import Chunk, KVCache
from kvjax.layers.rope import apply_rope
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
    (["model.eviction.policy=h2o", "model.eviction.protocol=later"],
     "model.eviction.protocol: got 'later', allowed: compaction, in_context"),
    (["model.eviction.policy=snapkv", "model.eviction.protocol=in_context"],
     "model.eviction.protocol: in_context cannot run policy snapkv"),
    (["model.eviction.policy=h2o", "model.eviction.protocol=in_context",
      "model.kv_sharing.factor=2"], "model.eviction.protocol: in_context needs every layer"),
    (["model.eviction.policy=h2o", "model.eviction.protocol=in_context",
      "model.kind=block_transformer"], "model.eviction.protocol: in_context needs model.kind"),
])
def test_config_errors_name_the_key(overrides, key):
  with pytest.raises(ConfigError, match=key) as e:
    kvjax.load_config(None, overrides)
  assert "\n" not in str(e.value)


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
  cfg = kvjax.load_config(None, ["model.eviction.policy=tova", "model.eviction.keep_ratio=0.5",
                                 "model.eviction.protocol=in_context"])
  assert registry.method_tag(cfg.model) == "llama/mha/tova@0.5/in_context"


def numpy_in_context(policy, q_TxHxD, k_TxKxD, v_TxKxD, n, size):
  """A cache of `size` tokens per K/V head that the first `n` tokens enter one at a time, in
  float64 and plain Python sets: each query attends over the cache and itself, then the policy's
  lowest-scored token other than the newest leaves if the cache is over size (the oldest on a
  tie). Returns the outputs `[n, H, D]`, what each query saw `[K, n, n]` and the positions each
  head holds at the end."""
  h, d = q_TxHxD.shape[1:]
  kh = k_TxKxD.shape[1]
  g = h // kh
  q, k, v = (np.asarray(x, np.float64) for x in (q_TxHxD, k_TxKxD, v_TxKxD))
  out = np.zeros((n, h, d))
  saw = np.zeros((kh, n, n), bool)
  held = [set() for _ in range(kh)]
  received = np.zeros((kh, n))
  for i in range(n):
    noise = np.asarray(random_scores(i, kh, len(q))) if policy == "random" else None
    for head in range(kh):
      sees = sorted(held[head] | {i})
      saw[head, i, sees] = True
      logits = q[i, head * g:(head + 1) * g] @ k[sees, head].T / np.sqrt(d)
      p = np.exp(logits - logits.max(axis=-1, keepdims=True))
      p /= p.sum(axis=-1, keepdims=True)
      out[i, head * g:(head + 1) * g] = p @ v[sees, head]
      probs = dict(zip(sees, p.mean(axis=0)))
      for j in sees:
        received[head, j] += probs[j]
      held[head] = set(sees)
      if len(sees) > size:
        score = {"h2o": lambda j: received[head, j] / (i - j + 1), "tova": lambda j: probs[j],
                 "local_window": lambda j: j, "random": lambda j: noise[head, j],
                 # sinks last, the latest of them first
                 "streaming_llm": lambda j: (j < STREAMING_SINKS, -j if j < STREAMING_SINKS else j),
                 }[policy]
        held[head].remove(min((j for j in sees if j != i), key=score))
  return out, saw, [sorted(x) for x in held]


def in_context_prefill(policy, q, k, v, lengths, keep_ratio, width):
  """An in-context eviction layout that `q`, `k`, `v` (`[B, S, ...]`) entered `width` positions
  at a time: the attention outputs `[B, S, H, D]` and the layout."""
  b, s, kh, d = k.shape
  layout = eviction_layout(b, s, kh, d, PlainStorage(), policy=policy, keep_ratio=keep_ratio,
                           readers=1, impl="xla", in_context=True)
  layout = layout.with_prompt_lengths(jnp.asarray(lengths, jnp.int32))
  step = jax.jit(lambda layout, chunk, q: layout.write(chunk).attend(q, chunk))
  outs = []
  for lo in range(0, s, width):
    pos = jnp.broadcast_to(jnp.arange(lo, lo + width), (b, width))
    out, layout = step(layout, Chunk(k[:, lo:lo + width], v[:, lo:lo + width], pos),
                       q[:, lo:lo + width])
    outs.append(out)
  return np.asarray(jnp.concatenate(outs, axis=1)), layout


@pytest.mark.parametrize("policy", IN_CONTEXT_POLICIES)
def test_in_context_eviction_equals_a_sequential_numpy_cache(policy):
  """Outputs and survivors against the oracle, with a right-padded prompt whose cache (3) is
  smaller than StreamingLLM's sinks."""
  b, s, kh, h, d = 2, 20, 2, 4, 8
  q = jax.random.normal(jax.random.key(1), (b, s, h, d)) * 2
  k, v = (jax.random.normal(jax.random.key(i), (b, s, kh, d)) for i in (2, 3))
  lengths, sizes = [20, 9], [7, 3]  # round(0.35 * length)
  out, layout = in_context_prefill(policy, q, k, v, lengths, 0.35, s)
  cache = KVCache(layers=(layout.finish_prefill(2, jax.random.key(0)),), max_len=s)
  for i, n in enumerate(lengths):
    want_out, _, want_held = numpy_in_context(policy, q[i], k[i], v[i], n, sizes[i])
    np.testing.assert_allclose(out[i, :n], want_out, atol=2e-5)
    assert kept_positions(cache)[0][i] == want_held


@pytest.mark.parametrize("policy", IN_CONTEXT_POLICIES)
def test_in_context_chunks_equal_one_write(policy):
  """Chunks of 5 positions; the padded prompt (length 13) ends inside one."""
  b, s, kh, h, d = 2, 20, 2, 4, 8
  q = jax.random.normal(jax.random.key(4), (b, s, h, d)) * 2
  k, v = (jax.random.normal(jax.random.key(i), (b, s, kh, d)) for i in (5, 6))
  whole, layout = in_context_prefill(policy, q, k, v, [20, 13], 0.4, s)
  chunked, chunked_layout = in_context_prefill(policy, q, k, v, [20, 13], 0.4, 5)
  np.testing.assert_allclose(chunked, whole, atol=1e-6)
  np.testing.assert_array_equal(chunked_layout.held, layout.held)
  np.testing.assert_array_equal(layout.held.sum(axis=-1), [[8, 8], [5, 5]])
  assert not np.asarray(layout.held)[1, :, 13:].any()  # no pad is held


def test_in_context_prefill_and_decode_equal_a_masked_forward():
  """The whole model: the logits of a right-padded prompt prefilled under in-context H2O and of
  the tokens decoded after it equal a forward pass in which each layer's query sees what the
  oracle's cache held for it (its own token included), then what the cache kept and the decoded
  tokens. The oracle runs layer by layer on the queries and keys of that forward."""
  cfg, model, params = evicting("h2o", 0.4, "model.eviction.protocol=in_context")
  m = cfg.model
  params = jax.tree.map(lambda x: 4 * x, params)  # sharp attention: what is seen matters
  tokens = random_tokens(2, 24, seed=8)
  lengths, new = [20, 15], 4
  cache, last, prompt_logits = prefill_cache(model, params, tokens[:, :20], lengths,
                                             init_cache(m, 2, 24), keep_logits=True)
  cache = cache.finish_prefill(new, jax.random.key(0))
  steps = []
  for j in range(new):
    pos_Bx1 = jnp.asarray(lengths)[:, None] + j
    logits, cache = model.apply({"params": params}, jnp.take_along_axis(tokens, pos_Bx1, axis=1),
                                positions=pos_Bx1, cache=cache)
    steps.append(logits[:, 0])

  t, j = np.arange(24)[:, None], np.arange(24)[None, :]
  masks = np.broadcast_to(j <= t, (m.num_layers, 2, m.num_kv_heads, 24, 24)).copy()

  def masked_forward():
    ref = KVCache(layers=tuple(MaskedLayout(jnp.asarray(x)) for x in masks), max_len=24)
    return model.apply({"params": params}, tokens, positions=jnp.arange(24)[None], cache=ref,
                       capture_intermediates=True)

  for layer in range(m.num_layers):  # the oracle's masks of the layers before are in place
    (_, _), inter = masked_forward()
    attn = inter["intermediates"][f"layer_{layer}"]["attn"]
    q = apply_rope(attn["q"]["__call__"][0], jnp.arange(24)[None], m.rope_theta)
    k, v = attn["kv"]["__call__"][0]
    for b, n in enumerate(lengths):
      _, saw, held = numpy_in_context("h2o", q[b], k[b], v[b], n, round(0.4 * n))
      for head in range(m.num_kv_heads):
        masks[layer, b, head, :n, :n] = saw[head]
        after = (j <= t) & (np.isin(j, held[head]) | (j >= n))
        masks[layer, b, head, n:] = after[n:]
  (want, _), _ = masked_forward()
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(prompt_logits[b, :n], want[b, :n], atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(last[b], want[b, n - 1], atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(np.stack(steps, axis=1)[b], want[b, n:n + new], atol=2e-4,
                               rtol=2e-4)
  dense = model.apply({"params": params}, tokens)  # eviction changed the prompt's logits
  assert np.abs(np.asarray(dense[0, :20]) - np.asarray(prompt_logits[0])).max() > 1e-2
