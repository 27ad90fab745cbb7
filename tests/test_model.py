"""The Llama-style model: cache equivalence, causality, GQA semantics, NNX interop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvjax.decode import init_cache
from tests.helpers import random_tokens, tiny_model

ATTENTION_KINDS = {"mha": "model.num_kv_heads=4", "gqa": "model.num_kv_heads=2",
                   "mqa": "model.num_kv_heads=1"}


@pytest.fixture(scope="module", params=list(ATTENTION_KINDS))
def built(request):
  return tiny_model(ATTENTION_KINDS[request.param])


def positions_of(start_B, length):
  return jnp.asarray(start_B)[:, None] + jnp.arange(length, dtype=jnp.int32)[None]


def test_prefill_then_steps_equal_full_forward(built):
  cfg, model, params = built
  tokens = random_tokens(3, 20)
  full = model.apply({"params": params}, tokens)
  cache = init_cache(cfg.model, 3, 32)
  logits, cache = model.apply({"params": params}, tokens[:, :12], positions=positions_of([0] * 3, 12),
                              cache=cache)
  np.testing.assert_allclose(logits, full[:, :12], atol=1e-5)
  for t in range(12, 20):
    step, cache = model.apply({"params": params}, tokens[:, t:t + 1],
                              positions=positions_of([t] * 3, 1), cache=cache)
    np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)


def test_ragged_prompts_prefill_then_steps(built):
  """Right-padded prompts of different lengths: each sequence continues at its own position."""
  cfg, model, params = built
  tokens = random_tokens(3, 16, seed=1)
  lengths = np.array([16, 5, 9])
  full = model.apply({"params": params}, tokens)
  padded = jnp.where(jnp.arange(16)[None] < lengths[:, None], tokens, 0)
  cache = init_cache(cfg.model, 3, 24)
  _, cache = model.apply({"params": params}, padded, positions=positions_of([0] * 3, 16), cache=cache)
  # Feed each sequence's true continuation one position at a time (the longest one repeats
  # its last position, which rewrites the same slot with the same K/V).
  for step in range(4):
    pos_B = np.minimum(lengths + step, 15)
    tok_B = tokens[jnp.arange(3), pos_B]
    out, cache = model.apply({"params": params}, tok_B[:, None], positions=jnp.asarray(pos_B)[:, None],
                             cache=cache)
    np.testing.assert_allclose(out[:, 0], full[jnp.arange(3), pos_B], atol=1e-5)


def test_logits_at_selected_positions_equal_the_full_forward(built):
  """The LM head at chosen positions only (with and without a cache), repeats allowed."""
  cfg, model, params = built
  tokens = random_tokens(3, 12, seed=5)
  full = np.asarray(model.apply({"params": params}, tokens))
  at_BxN = jnp.asarray([[11, 0, 4], [3, 3, 7], [0, 9, 11]], jnp.int32)
  want = np.take_along_axis(full, np.asarray(at_BxN)[..., None], axis=1)
  got = model.apply({"params": params}, tokens, logits_at=at_BxN)
  np.testing.assert_allclose(got, want, atol=1e-5)
  got, _ = model.apply({"params": params}, tokens, positions=positions_of([0] * 3, 12),
                       cache=init_cache(cfg.model, 3, 16), logits_at=at_BxN)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_causality(built):
  """d logits[t] / d input embedding[t+1:] == 0 (the embedding output is perturbed by an interceptor)."""
  cfg, model, params = built
  tokens = random_tokens(1, 10, seed=2)

  def logits_given(delta_BxTxE):
    def add_delta(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      return out + delta_BxTxE if context.method_name == "encode" else out
    with nn.intercept_methods(add_delta):
      return model.apply({"params": params}, tokens)

  delta = jnp.zeros((1, 10, cfg.model.d_model))
  for t in (0, 4, 8):
    grad = jax.grad(lambda d: logits_given(d)[0, t].sum())(delta)
    assert float(jnp.abs(grad[0, t + 1:]).max()) == 0.0
    assert float(jnp.abs(grad[0, : t + 1]).max()) > 0.0


def test_gqa_with_replicated_kv_heads_equals_mha():
  cfg_g, model_g, params_g = tiny_model("model.num_kv_heads=2")
  cfg_m, model_m, _ = tiny_model("model.num_kv_heads=4")
  group = cfg_g.model.num_heads // cfg_g.model.num_kv_heads
  unboxed = nn.unbox(params_g)

  def widen(path, leaf):
    names = [getattr(k, "key", "") for k in path]
    if names[-2:-1] in (["k"], ["v"]) and "kv" in names:
      return jnp.repeat(leaf, group, axis=1)  # (embed, kv_heads, head_dim)
    return leaf

  params_m = jax.tree_util.tree_map_with_path(widen, unboxed)
  tokens = random_tokens(2, 12, seed=3)
  np.testing.assert_allclose(model_g.apply({"params": unboxed}, tokens),
                             model_m.apply({"params": params_m}, tokens), atol=1e-5)


def test_every_param_has_logical_axes():
  _, _, params = tiny_model()
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim


def test_untied_embeddings_have_a_head():
  _, model, params = tiny_model("model.tie_embeddings=false")
  assert "head" in params["embed"]
  assert model.apply({"params": params}, random_tokens(1, 4)).shape == (1, 4, 264)


def test_bfloat16_weights_activations_and_cache_decode_like_the_full_forward():
  """One sequence (a one-row product in every projection): prefill and steps through a
  bfloat16 cache equal the bfloat16 full forward to bfloat16 precision, and stay near float32."""
  cfg, model, params = tiny_model(*(f"model.{k}=bfloat16" for k in
                                    ("dtype", "param_dtype", "cache_dtype")))
  assert {x.dtype for x in jax.tree.leaves(nn.unbox(params))} == {jnp.dtype(jnp.bfloat16)}
  tokens = random_tokens(1, 12, seed=6)
  full = np.asarray(model.apply({"params": params}, tokens))
  cache = init_cache(cfg.model, 1, 16)
  assert {x.dtype for x in jax.tree.leaves(cache)} == {jnp.dtype(jnp.bfloat16)}
  logits, cache = model.apply({"params": params}, tokens[:, :8], positions=positions_of([0], 8),
                              cache=cache)
  got = [np.asarray(logits[0])]
  for t in range(8, 12):
    step, cache = model.apply({"params": params}, tokens[:, t:t + 1],
                              positions=positions_of([t], 1), cache=cache)
    got.append(np.asarray(step[0]))
  scale = np.abs(full).max()
  np.testing.assert_allclose(np.concatenate(got), full[0], atol=2e-2 * scale)
  f32_params = jax.tree.map(lambda x: x.astype(jnp.float32), nn.unbox(params))
  f32 = np.asarray(tiny_model()[1].apply({"params": f32_params}, tokens))
  np.testing.assert_allclose(full, f32, atol=5e-2 * scale)


def test_nnx_bridge_wraps_the_model():
  """NNX users wrap the Linen model; outside a mesh, logical axes must not shard eagerly."""
  cfg, model, _ = tiny_model()
  tokens = random_tokens(2, 8)
  with nnx.use_eager_sharding(False):
    wrapped = nnx.bridge.ToNNX(model, rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(wrapped, tokens)
    out = wrapped(tokens)
  assert out.shape == (2, 8, cfg.model.vocab_size)
  params = nnx.to_pure_dict(nnx.state(wrapped, nnx.Param))
  np.testing.assert_allclose(out, model.apply({"params": params}, tokens), atol=1e-6)
