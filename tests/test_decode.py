"""The generate loop and samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.decode import SamplingConfig, generate, init_cache
from kvjax.decode.sampling import filter_logits, sample
from tests.helpers import random_tokens, tiny_model


@pytest.fixture(scope="module")
def built():
  return tiny_model("model.num_kv_heads=2")


def greedy_by_full_forward(model, params, prompt, n):
  """Reference: run the whole sequence (in a fixed-width causal buffer) each step, take the argmax."""
  forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
  length = len(prompt)
  seq = np.zeros((1, length + n), np.int32)
  seq[0, :length] = np.asarray(prompt)
  for t in range(length, length + n):
    seq[0, t] = int(jnp.argmax(forward(seq)[0, t - 1]))
  return list(seq[0, length:])


def test_greedy_generate_matches_full_forward_argmax(built):
  cfg, model, params = built
  prompts = random_tokens(3, 10, seed=4)
  lengths = np.array([10, 3, 7])
  out = generate(model, params, prompts, lengths, max_new_tokens=8, rng=jax.random.key(0),
                 cache=init_cache(cfg.model, 3, 24))
  for b in range(3):
    expected = greedy_by_full_forward(model, params, prompts[b, :lengths[b]], 8)
    assert list(np.asarray(out.tokens[b])) == expected
  assert list(np.asarray(out.lengths)) == [8, 8, 8]


def test_eos_stops_a_sequence_and_pads_the_rest(built):
  cfg, model, params = built
  prompts = random_tokens(2, 6, seed=5)
  free = generate(model, params, prompts, np.array([6, 6]), max_new_tokens=6,
                  rng=jax.random.key(0), cache=init_cache(cfg.model, 2, 16))
  eos = int(free.tokens[0, 2])  # the third greedy token of sequence 0 becomes "EOS"
  out = generate(model, params, prompts, np.array([6, 6]), max_new_tokens=6,
                 rng=jax.random.key(0), cache=init_cache(cfg.model, 2, 16), eos_id=eos, pad_id=257)
  first_eos = list(np.asarray(free.tokens[0])).index(eos)
  assert int(out.lengths[0]) == first_eos + 1
  np.testing.assert_array_equal(out.tokens[0, :first_eos + 1], free.tokens[0, :first_eos + 1])
  assert (np.asarray(out.tokens[0, first_eos + 1:]) == 257).all()


def test_prompt_that_does_not_fit_is_rejected(built):
  cfg, model, params = built
  prompts = random_tokens(1, 10)
  with pytest.raises(ValueError, match="does not fit a cache of 16 positions"):
    generate(model, params, prompts, np.array([10]), max_new_tokens=7, rng=jax.random.key(0),
             cache=init_cache(cfg.model, 1, 16))
  with pytest.raises(ValueError, match="exceeds model.max_seq_len=64"):
    init_cache(cfg.model, 1, 65)


def test_sampling_is_seeded_and_varies(built):
  cfg, model, params = built
  prompts = random_tokens(4, 5, seed=6)
  kw = dict(max_new_tokens=6, sampling=SamplingConfig(temperature=1.5, top_k=50, top_p=0.95))
  run = lambda seed: generate(model, params, prompts, np.full(4, 5), rng=jax.random.key(seed),
                              cache=init_cache(cfg.model, 4, 16), **kw).tokens
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.array_equal(run(1), run(2))


def test_cache_reports_its_bytes(built):
  cfg, _, _ = built
  cache = init_cache(cfg.model, 3, 40)
  m = cfg.model  # K and V of 2 layers x 2 KV heads x 16 dims in float32, 3 x 40 positions
  assert (m.num_kv_layers, m.num_kv_heads, m.head_dim_) == (2, 2, 16)
  assert cache.nbytes == 2 * 2 * 2 * 16 * 4 * 3 * 40


def test_top_k_keeps_exactly_k():
  logits = jax.random.normal(jax.random.key(0), (5, 50))
  kept = jnp.isfinite(filter_logits(logits, 7, 1.0))
  assert (kept.sum(-1) == 7).all()
  top = jnp.argsort(-logits, axis=-1)[:, :7]
  assert bool(jnp.take_along_axis(kept, top, axis=-1).all())


def test_top_p_keeps_smallest_nucleus():
  probs = jnp.array([[0.5, 0.3, 0.15, 0.05]])
  logits = jnp.log(probs)
  assert list(np.asarray(jnp.isfinite(filter_logits(logits, 0, 0.7))[0])) == [True, True, False, False]
  assert list(np.asarray(jnp.isfinite(filter_logits(logits, 0, 0.5))[0])) == [True, False, False, False]
  assert list(np.asarray(jnp.isfinite(filter_logits(logits, 0, 0.96))[0])) == [True] * 4


def test_sample_distribution_follows_temperature():
  logits = jnp.log(jnp.array([[0.7, 0.2, 0.1]]))
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = jax.vmap(lambda k: sample(logits, k, SamplingConfig(temperature=1.0))[0])(keys)
  freq = np.bincount(np.asarray(draws), minlength=3) / 4000
  np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.03)
  assert int(sample(logits, keys[0], SamplingConfig())[0]) == 0


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0)])
def test_bad_sampling_config(kwargs):
  with pytest.raises(ValueError):
    SamplingConfig(**kwargs)
