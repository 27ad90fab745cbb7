"""Small shared builders for tests: tiny configs, models and params."""

import jax
import jax.numpy as jnp
import numpy as np

import kvjax

TINY = ("model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.mlp_dim=128",
        "model.max_seq_len=64", "data.seq_len=32")


def tiny_model(*overrides: str, seed: int = 0):
  """Returns (cfg, model, params) for a tiny random model."""
  cfg = kvjax.load_config(None, [*TINY, *overrides])
  model = kvjax.build_model(cfg.model)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = model.init(jax.random.key(seed), tokens)["params"]
  return cfg, model, params


def random_tokens(batch: int, length: int, seed: int = 0, vocab: int = 256):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, jnp.int32)


def kept_counts(cache):
  """`[L_kv, B, K]` tokens kept per layer, sequence and K/V head of a compacted cache."""
  return np.stack([layer.kept_counts() for layer in cache.layers])
