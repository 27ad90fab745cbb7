"""Cross-layer attention: sharing patterns, consumers without K/V, a cache of producers only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kvjax
from kvjax.decode import SamplingConfig, generate, init_cache
from kvjax.decode.throughput import measure
from kvjax.errors import ConfigError
from tests.helpers import random_tokens, tiny_model

SIX = "model.num_layers=6"
PATTERNS = {
    "cla2_mqa": (SIX, "model.num_kv_heads=1", "model.kv_sharing.factor=2"),
    "cla3_mha": (SIX, "model.num_kv_heads=4", "model.kv_sharing.factor=3"),
    # The last three layers reuse layer 2, after a pair: any valid pattern, here with GQA.
    "irregular_gqa": (SIX, "model.num_kv_heads=2", "model.kv_sharing.producer_of=[0,0,2,2,2,2]"),
}
EXPECTED_PRODUCER_OF = {"cla2_mqa": (0, 0, 2, 2, 4, 4), "cla3_mha": (0, 0, 0, 3, 3, 3),
                        "irregular_gqa": (0, 0, 2, 2, 2, 2)}


@pytest.fixture(scope="module", params=list(PATTERNS))
def built(request):
  return request.param, *tiny_model(*PATTERNS[request.param])


def positions_of(start, batch, length):
  return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))


def test_pattern_resolves(built):
  name, cfg, _, _ = built
  assert cfg.model.producer_of == EXPECTED_PRODUCER_OF[name]


def test_prefill_then_steps_equal_full_forward(built):
  _, cfg, model, params = built
  apply = jax.jit(model.apply)
  tokens = random_tokens(2, 16, seed=4)
  full = apply({"params": params}, tokens)
  cache = init_cache(cfg.model, 2, 24)
  logits, cache = apply({"params": params}, tokens[:, :10], positions=positions_of(0, 2, 10),
                        cache=cache)
  np.testing.assert_allclose(logits, full[:, :10], atol=1e-5)
  for t in range(10, 16):
    step, cache = apply({"params": params}, tokens[:, t:t + 1], positions=positions_of(t, 2, 1),
                        cache=cache)
    np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)


def test_generate_loop_matches_greedy_full_forward(built):
  """The jitted decode loop, reading shared buffers, picks what the full forward's argmax picks."""
  _, cfg, model, params = built
  prompts = random_tokens(2, 6, seed=5)
  out = generate(model, params, prompts, np.array([6, 6]), max_new_tokens=8, rng=jax.random.key(0),
                 cache=init_cache(cfg.model, 2, 16), sampling=SamplingConfig())
  text = jnp.concatenate([prompts, out.tokens], axis=1)
  greedy = jnp.argmax(model.apply({"params": params}, text), axis=-1)
  np.testing.assert_array_equal(out.tokens, greedy[:, 5:13])


def test_consumers_own_no_kv_parameters(built):
  name, cfg, _, params = built
  m = cfg.model
  for layer, p in enumerate(EXPECTED_PRODUCER_OF[name]):
    attn = params[f"layer_{layer}"]["attn"]
    assert ("kv" in attn) == (p == layer)
    if p == layer:
      assert attn["kv"]["k"]["kernel"].value.shape == (m.d_model, m.num_kv_heads, m.head_dim_)
  # Everything else matches the unshared model: the difference is the consumers' K and V kernels.
  _, _, unshared = tiny_model(SIX, f"model.num_kv_heads={m.num_kv_heads}")
  consumers = sum(p != layer for layer, p in enumerate(EXPECTED_PRODUCER_OF[name]))
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(unshared) - count(params) == consumers * 2 * 64 * m.num_kv_heads * 16


def test_train_step_reaches_every_parameter():
  """One Adam step from the LM loss: every gradient finite and nonzero, and the loss drops."""
  _, model, params = tiny_model(*PATTERNS["irregular_gqa"])
  params = nn.unbox(params)
  tokens = random_tokens(4, 17, seed=6)

  def loss_fn(p):
    logits = model.apply({"params": p}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  for g in jax.tree.leaves(grads):
    assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0
  opt = optax.adam(1e-2)
  updates, _ = opt.update(grads, opt.init(params), params)
  assert float(jax.jit(loss_fn)(optax.apply_updates(params, updates))) < float(loss)


def test_consumer_attends_to_producer_kv():
  """With the producer's residual updates zeroed, its consumer sees the producer's own input, so
  CLA2 must equal the unshared model whose second layer carries the first layer's K/V weights."""
  _, shared_model, shared = tiny_model("model.kv_sharing.factor=2")
  _, plain_model, _ = tiny_model()
  shared = nn.unbox(shared)
  layer0 = dict(shared["layer_0"], attn=dict(shared["layer_0"]["attn"]),
                mlp=dict(shared["layer_0"]["mlp"]))
  layer0["attn"]["o"] = jax.tree.map(jnp.zeros_like, layer0["attn"]["o"])
  layer0["mlp"]["down"] = jax.tree.map(jnp.zeros_like, layer0["mlp"]["down"])
  shared = dict(shared, layer_0=layer0)
  plain = dict(shared, layer_1=dict(shared["layer_1"],
                                    attn=dict(shared["layer_1"]["attn"], kv=layer0["attn"]["kv"])))
  tokens = random_tokens(2, 12, seed=7)
  np.testing.assert_allclose(shared_model.apply({"params": shared}, tokens),
                             plain_model.apply({"params": plain}, tokens), atol=1e-5)


def cache_bytes(*overrides):
  cfg = kvjax.load_config(None, ["model.num_layers=6", "model.d_model=64", "model.num_heads=4",
                                 "model.num_kv_heads=1", *overrides])
  return init_cache(cfg.model, batch=3, max_len=40).nbytes, cfg.model.kv_bytes_per_token()


def test_cache_holds_one_buffer_per_producer():
  mqa, mqa_per_token = cache_bytes()
  cla2, cla2_per_token = cache_bytes("model.kv_sharing.factor=2")
  cla3, _ = cache_bytes("model.kv_sharing.factor=3")
  last3, _ = cache_bytes("model.kv_sharing.producer_of=[0,1,2,2,2,2]")
  # 2 (K, V) x 1 KV head x head_dim 16 x producers x 4 bytes x 3 sequences x 40 tokens.
  assert mqa == 2 * 1 * 16 * 6 * 4 * 3 * 40
  assert cla2 == 2 * 1 * 16 * 3 * 4 * 3 * 40 and cla2 * 2 == mqa
  assert cla3 == 2 * 1 * 16 * 2 * 4 * 3 * 40
  assert last3 == 2 * 1 * 16 * 3 * 4 * 3 * 40
  assert (mqa_per_token, cla2_per_token) == (mqa // 120, cla2 // 120)
  cfg = kvjax.load_config(None, ["model.num_layers=6", "model.kv_sharing.factor=2"])
  assert len(init_cache(cfg.model, batch=1, max_len=8).layers) == 3


def test_decode_harness_reports_producer_bytes():
  """decode.py's `kv_bytes_per_token` is read off the cache: CLA2 over 6 layers holds 3 buffers."""
  cfg, model, params = tiny_model(*PATTERNS["cla2_mqa"])
  report = measure(model, params, cfg.model, batch=2, prompt_len=4, gen_len=4)
  assert report["kv_bytes_per_token"] == 2 * 1 * 16 * 3 * 4
  assert report["kv_cache_bytes"] == 2 * 1 * 16 * 3 * 4 * 2 * 8


@pytest.mark.parametrize("overrides,message", [
    (("model.kv_sharing.producer_of=[0,0,2]",), "needs one entry per layer (model.num_layers=4), got 3"),
    (("model.kv_sharing.producer_of=[1,1,2,2]",), "layer 0 must read K/V of itself or an earlier layer"),
    (("model.kv_sharing.producer_of=[0,0,-1,2]",), "layer 2 must read K/V of itself or an earlier layer"),
    (("model.kv_sharing.producer_of=[0,1,0,3]",), "must be non-decreasing"),
    (("model.kv_sharing.producer_of=[0,0,1,1]",), "layer 2 reads layer 1, which is not a producer"),
    (("model.kv_sharing.producer_of=[0,0,2,2]", "model.kv_sharing.factor=2"),
     "set either factor or producer_of, not both"),
    (("model.kv_sharing.factor=0",), "must be in 1..model.num_layers=4, got 0"),
    (("model.kv_sharing.factor=5",), "must be in 1..model.num_layers=4, got 5"),
    (("model.kv_sharing.producer_of=[0,0.5,2,2]",), "producer_of[1]: must be an integer"),
    (("model.kv_sharing.stride=2",), "unknown key; allowed: factor, producer_of"),
])
def test_invalid_patterns_are_rejected(overrides, message):
  with pytest.raises(ConfigError, match="model.kv_sharing") as err:
    kvjax.load_config(None, ["model.num_layers=4", *overrides])
  assert message in str(err.value)


def test_shrinking_num_layers_invalidates_an_explicit_pattern():
  with pytest.raises(ConfigError, match="needs one entry per layer"):
    kvjax.load_config(None, ["model.kv_sharing.producer_of=[0,0,2,2]", "model.num_layers=2"])
