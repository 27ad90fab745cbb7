"""Attention-influence profiling against finite differences, and the masked validation loss."""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kvjax.layers.cache import KVCache, Layout
from kvjax.moa.masks import prefill_mask
from kvjax.moa.profile import block_influence, masked_loss, response_losses
from tests.helpers import random_tokens, tiny_model

T = 16
LAYER, HEAD, ROW = 1, 3, 11
RECORDED = []  # probabilities seen while tracing `loss_and_probs`


@pytest.fixture(scope="module")
def setup():
  cfg, model, params = tiny_model()
  tokens = random_tokens(2, T, seed=7)
  weights = jnp.zeros((2, T), jnp.int32).at[:, -6:].set(1)  # the "response"
  return cfg, model, params, tokens, weights


@flax.struct.dataclass
class PerturbedLayout(Layout):
  """Reference attention over a whole sequence whose probabilities get `delta` added (no
  renormalisation)."""

  delta: jax.Array  # B x H x T x T

  def write(self, chunk):
    return self

  def attend(self, q_BxTxHxD, chunk):
    b, t, h, d = q_BxTxHxD.shape
    k_BxTxHxD = jnp.repeat(chunk.k, h // chunk.k.shape[2], axis=2)
    v_BxTxHxD = jnp.repeat(chunk.v, h // chunk.v.shape[2], axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q_BxTxHxD, k_BxTxHxD) / np.sqrt(d)
    probs = jax.nn.softmax(jnp.where(np.tril(np.ones((t, t), bool)), logits, -1e30), axis=-1)
    RECORDED.append(probs)
    return jnp.einsum("bhts,bshd->bthd", probs + self.delta, v_BxTxHxD), self


def test_influence_equals_the_formula_with_finite_differences(setup):
  cfg, model, params, tokens, weights = setup

  @jax.jit
  def loss_and_probs(delta_LxBxHxTxT):
    RECORDED.clear()
    cache = KVCache(layers=tuple(PerturbedLayout(delta_LxBxHxTxT[i]) for i in range(2)),
                    max_len=T)
    loss = jnp.sum(response_losses(model, params, tokens, weights, cache))
    return loss, jnp.stack(RECORDED)

  zero = jnp.zeros((2, 2, cfg.model.num_heads, T, T))
  _, probs = loss_and_probs(zero)
  a = np.asarray(probs[LAYER, 0, HEAD, ROW, :ROW + 1], np.float64)
  eps = 1e-2
  g = np.array([(loss_and_probs(zero.at[LAYER, 0, HEAD, ROW, n].set(eps))[0]
                 - loss_and_probs(zero.at[LAYER, 0, HEAD, ROW, n].set(-eps))[0]) / (2 * eps)
                for n in range(ROW + 1)], np.float64)
  want = -a / (1 - a) * (g - np.sum(g * a))  # the paper's E_ij, from finite differences

  got = block_influence(model, params, tokens, weights, block=1)
  np.testing.assert_allclose(got[LAYER, 0, HEAD, ROW, :ROW + 1], np.abs(want), rtol=3e-2,
                             atol=3e-2 * np.abs(want).max())
  assert float(got[LAYER, 0, HEAD, ROW, ROW + 1:].max()) == 0.0  # the future is never seen
  blocks = block_influence(model, params, tokens, weights, block=4)
  np.testing.assert_allclose(blocks[:, :, :, 2, 1], got[:, :, :, 8:12, 4:8].sum(axis=(-1, -2)),
                             rtol=1e-4, atol=1e-7)


def test_masked_loss_with_full_masks_is_the_dense_loss(setup):
  cfg, model, params, tokens, weights = setup
  logits = model.apply({"params": params}, tokens)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
  dense = jnp.mean(jnp.sum(ce * weights[:, 1:], axis=1) / 6.0)  # 6 scored targets each
  full = np.broadcast_to(prefill_mask(T, [T] * 4, 4, 4), (2, 4, T, T))
  np.testing.assert_allclose(masked_loss(model, params, tokens, weights, full), dense, rtol=1e-5)
  narrow = np.broadcast_to(prefill_mask(T, [1] * 4, 4, 1), (2, 4, T, T))
  assert abs(float(masked_loss(model, params, tokens, weights, narrow)) - float(dense)) > 1e-3
