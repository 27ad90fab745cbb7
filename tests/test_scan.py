"""Scanned layers (`model.scan_layers`): the same model as the unrolled one, in one `nn.scan`;
and `model.remat`, which changes memory, never values."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kvjax
from kvjax.cache.dense import StackedKVCache
from kvjax.decode import SamplingConfig, generate, init_cache
from kvjax.errors import ConfigError
from kvjax.models.llama import stack_layers, unstack_layers
from kvjax.training import restore_params, train
from tests.helpers import random_tokens, tiny_model

SIX = "model.num_layers=6"
PATTERNS = {
    "mha": (SIX,),
    "cla2_mqa": (SIX, "model.num_kv_heads=1", "model.kv_sharing.factor=2"),
    "cla3_gqa": (SIX, "model.kv_sharing.factor=3"),
}


@pytest.fixture(scope="module", params=list(PATTERNS))
def pair(request):
  """(unrolled cfg, model, params) and (scanned cfg, model) of one pattern, same weights."""
  cfg, model, params = tiny_model(*PATTERNS[request.param])
  scanned_cfg = kvjax.load_config(None, [*cfg_overrides(cfg), "model.scan_layers=true"])
  return cfg, model, nn.meta.unbox(params), scanned_cfg, kvjax.build_model(scanned_cfg.model)


def cfg_overrides(cfg):
  m = cfg.model
  return [f"model.{k}={getattr(m, k)}" for k in ("d_model", "num_layers", "num_heads",
                                                 "num_kv_heads", "mlp_dim", "max_seq_len")] + [
      f"model.kv_sharing.factor={m.kv_sharing.factor}", f"data.seq_len={cfg.data.seq_len}"]


def positions_of(start, batch, length):
  return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))


def test_scanned_params_are_the_unrolled_ones_stacked(pair):
  cfg, _, params, scanned_cfg, scanned = pair
  own = scanned.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  stacked = stack_layers(params, cfg.model)
  assert jax.tree.structure(stacked) == jax.tree.structure(nn.meta.unbox(own))
  groups = cfg.model.num_layers // scanned_cfg.model.scan_group_size
  for j, layer in stacked["layers"].items():
    assert all(x.shape[0] == groups for x in jax.tree.leaves(layer))
    assert ("kv" in layer["attn"]) == (j == "layer_0")  # only a group's producer owns K/V
  # The group axis is named, so sharding rules can place it.
  q = own["layers"]["layer_0"]["attn"]["q"]["kernel"]
  assert q.names[0] == "layers"
  restored = unstack_layers(stacked, cfg.model)
  assert jax.tree.all(jax.tree.map(np.array_equal, restored, params))


def test_scanned_forward_equals_unrolled(pair):
  cfg, model, params, _, scanned = pair
  tokens = random_tokens(2, 16, seed=3)
  want = model.apply({"params": params}, tokens)
  got = scanned.apply({"params": stack_layers(params, cfg.model)}, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_scanned_prefill_then_steps_equal_full_forward(pair):
  cfg, model, params, scanned_cfg, scanned = pair
  stacked = stack_layers(params, cfg.model)
  apply = jax.jit(scanned.apply)
  tokens = random_tokens(2, 16, seed=4)
  full = model.apply({"params": params}, tokens)
  cache = init_cache(scanned_cfg.model, 2, 24)
  assert isinstance(cache, StackedKVCache)
  assert cache.nbytes == init_cache(cfg.model, 2, 24).nbytes  # one buffer per producer either way
  logits, cache = apply({"params": stacked}, tokens[:, :10], positions=positions_of(0, 2, 10),
                        cache=cache)
  np.testing.assert_allclose(logits, full[:, :10], atol=1e-5)
  for t in range(10, 16):
    step, cache = apply({"params": stacked}, tokens[:, t:t + 1],
                        positions=positions_of(t, 2, 1), cache=cache)
    np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)


def test_scanned_generate_gives_the_unrolled_tokens(pair):
  cfg, model, params, scanned_cfg, scanned = pair
  prompts, lengths = random_tokens(2, 6, seed=5), np.array([6, 4])
  run = lambda m, p, c: generate(m, p, prompts, lengths, max_new_tokens=8, rng=jax.random.key(0),
                                 cache=init_cache(c, 2, 16), sampling=SamplingConfig()).tokens
  np.testing.assert_array_equal(run(scanned, stack_layers(params, cfg.model), scanned_cfg.model),
                                run(model, params, cfg.model))


def test_scanned_gradients_are_the_unrolled_ones_stacked(pair):
  cfg, model, params, _, scanned = pair
  tokens = random_tokens(2, 12, seed=6)

  def loss(m, p):
    logits = m.apply({"params": p}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  want = stack_layers(jax.jit(jax.grad(lambda p: loss(model, p)))(params), cfg.model)
  got = jax.jit(jax.grad(lambda p: loss(scanned, p)))(stack_layers(params, cfg.model))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want)


def test_train_py_trains_and_decodes_a_scanned_model(text_dir, tmp_path):
  cfg = kvjax.load_config(None, [
      SIX, "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1", "model.mlp_dim=64",
      "model.kv_sharing.factor=2", "model.scan_layers=true", "model.max_seq_len=64",
      f"data.source={text_dir}", "data.seq_len=32", "train.steps=6", "train.batch_size=4",
      "train.warmup_steps=0", "train.eval_every=6", "train.eval_batches=1",
      "train.checkpoint_every=6", "train.log_every=3", "train.sample_tokens=0"])
  result = train(cfg, str(tmp_path))
  assert np.isfinite(result.val_loss)
  params = restore_params(str(tmp_path), cfg)
  assert params["layers"]["layer_0"]["attn"]["q"]["kernel"].shape[0] == 3  # 3 groups of 2
  unrolled = dataclasses.replace(cfg.model, scan_layers=False)
  tokens = random_tokens(1, 8, seed=7)
  np.testing.assert_allclose(
      kvjax.build_model(cfg.model).apply({"params": params}, tokens),
      kvjax.build_model(unrolled).apply({"params": unstack_layers(params, cfg.model)}, tokens),
      atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ((SIX, "model.kv_sharing.producer_of=[0,0,2,2,2,2]"), "same size"),
    (("model.num_layers=5", "model.kv_sharing.factor=2"), "same size"),
    (("model.attention_gate.enable=true",), "attention_gate.enable"),
    (("model.eviction.policy=h2o",), "eviction.policy"),
])
def test_patterns_and_methods_that_cannot_be_scanned_are_rejected(overrides, message):
  with pytest.raises(ConfigError, match=message):
    kvjax.load_config(None, [*overrides, "model.scan_layers=true"])


def test_block_transformer_scans_both_decoders():
  overrides = ("model.kind=block_transformer", "model.block.block_len=4", "model.num_layers=2")
  cfg, model, params = tiny_model(*overrides)
  scanned_cfg, scanned, _ = tiny_model(*overrides, "model.scan_layers=true")
  params = nn.meta.unbox(params)
  stacked = {**params, **{name: stack_layers(params[name], cfg.model.decoder(name))
                          for name in ("block_decoder", "token_decoder")}}
  prompts, lengths = random_tokens(2, 6, seed=8), np.array([6, 5])
  run = lambda m, p, c: generate(m, p, prompts, lengths, max_new_tokens=8, rng=jax.random.key(0),
                                 cache=init_cache(c, 2, 16), sampling=SamplingConfig()).tokens
  np.testing.assert_array_equal(run(scanned, stacked, scanned_cfg.model),
                                run(model, params, cfg.model))


@pytest.mark.parametrize("scan", ["false", "true"])
def test_remat_recomputes_layers_with_the_same_gradients(scan):
  base = ("model.num_layers=4", "model.kv_sharing.factor=2", f"model.scan_layers={scan}")
  _, model, params = tiny_model(*base)
  _, remat_model, _ = tiny_model(*base, "model.remat=true")
  params, tokens = nn.meta.unbox(params), random_tokens(2, 12, seed=9)

  def grad_fn(m):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        m.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:]).mean()
    return jax.grad(loss)

  is_remat = lambda m: "remat" in str(jax.make_jaxpr(grad_fn(m))(params))  # jax.checkpoint
  assert is_remat(remat_model) and not is_remat(model)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               jax.jit(grad_fn(remat_model))(params), jax.jit(grad_fn(model))(params))
