"""Attention-influence profiling: how much the loss would change if each attention entry were
masked out, summed into blocks, per (layer, head).

For entry (i, j) of a softmax row, masking it and renormalising the row changes the loss, to
first order, by `E_ij = -A_ij / (1 - A_ij) * (dL/dA_ij - sum_n dL/dA_in * A_in)`. Since the
bracket times `A_ij` is the gradient of the loss w.r.t. the logit, `E = -dL/dZ / (1 - A)`: one
backward pass gives every entry. The attention below has a custom VJP that returns the usual
gradients and, as the cotangent of a zero "probe" input, `|E|` summed over `block x block`
tiles, so the full `T x T` matrices never leave a layer.

The model runs unchanged: `InfluenceLayout` and `MaskedLayout` are layouts over one whole
sequence (`kvjax.layers.cache`), passed as the model's cache. Profiling needs one layout per
layer: a model without cross-layer K/V sharing.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kvjax.cache.sequence import MaskedLayout
from kvjax.layers.cache import Chunk, KVCache, Layout
from kvjax.layers.dot_product import NEG_INF


def _probs(q_BxTxKxGxD, k_BxSxKxD):
  t, d = q_BxTxKxGxD.shape[1], q_BxTxKxGxD.shape[-1]
  logits = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  causal_TxS = np.tril(np.ones((t, k_BxSxKxD.shape[1]), bool))
  return jax.nn.softmax(jnp.where(causal_TxS, logits, NEG_INF), axis=-1)


def _split_heads(q_BxTxHxD, kv_heads):
  b, t, h, d = q_BxTxHxD.shape
  return q_BxTxHxD.reshape(b, t, kv_heads, h // kv_heads, d)


def causal_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD):
  """Causal attention over one whole sequence from position 0: `(out_BxTxHxD, probs_BxKxGxTxT)`,
  the probabilities in float32."""
  probs = _probs(_split_heads(q_BxTxHxD, k_BxTxKxD.shape[2]), k_BxTxKxD)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_BxTxKxD.dtype), v_BxTxKxD)
  return out.reshape(q_BxTxHxD.shape), probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def influence_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, probe_BxHxMxM, block: int):
  """Causal attention (positions 0..T-1, T a multiple of `block`); the gradient w.r.t.
  `probe_BxHxMxM` (any values: it does not enter the output) is the block-summed |E|."""
  del probe_BxHxMxM, block
  return causal_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD)[0]


def _fwd(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, probe_BxHxMxM, block):
  out = influence_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, probe_BxHxMxM, block)
  return out, (q_BxTxHxD, k_BxTxKxD, v_BxTxKxD)


def _bwd(block, res, dout_BxTxHxD):
  q_BxTxHxD, k_BxTxKxD, v_BxTxKxD = res
  b, t, h, d = q_BxTxHxD.shape
  q = _split_heads(q_BxTxHxD, k_BxTxKxD.shape[2])
  dout = _split_heads(dout_BxTxHxD, k_BxTxKxD.shape[2])
  a = _probs(q, k_BxTxKxD)  # recomputed: one layer's T x T at a time
  da = jnp.einsum("btkgd,bskd->bkgts", dout, v_BxTxKxD, preferred_element_type=jnp.float32)
  dz = a * (da - jnp.sum(da * a, axis=-1, keepdims=True))
  scale = d ** -0.5
  dq = jnp.einsum("bkgts,bskd->btkgd", dz, k_BxTxKxD).reshape(b, t, h, d) * scale
  dk = jnp.einsum("bkgts,btkgd->bskd", dz, q) * scale
  dv = jnp.einsum("bkgts,btkgd->bskd", a, dout)
  e = jnp.where(a < 1.0, -dz / jnp.where(a < 1.0, 1.0 - a, 1.0), 0.0)
  m = t // block
  e_blocks = jnp.abs(e).reshape(b, h, m, block, m, block).sum(axis=(3, 5))
  return (dq.astype(q_BxTxHxD.dtype), dk.astype(k_BxTxKxD.dtype), dv.astype(v_BxTxKxD.dtype),
          e_blocks)


influence_attention.defvjp(_fwd, _bwd)


@flax.struct.dataclass
class InfluenceLayout(Layout):
  """Causal attention within the chunk (a whole sequence), whose probe's gradient is this
  layer's block influence."""

  probe: jax.Array  # B x H x T/block x T/block
  block: int = flax.struct.field(pytree_node=False)

  def write(self, chunk: Chunk) -> InfluenceLayout:  # noqa: ARG002 (attention reads the chunk)
    return self

  def attend(self, q_BxTxHxD: jax.Array, chunk: Chunk) -> tuple[jax.Array, InfluenceLayout]:
    return influence_attention(q_BxTxHxD, chunk.k, chunk.v, self.probe, self.block), self


def response_losses(model, params, tokens_BxT, weights_BxT, cache) -> jax.Array:
  """`[B]`: each sequence's mean next-token cross-entropy over its tokens of weight 1 (the
  responses), run through `cache`."""
  b, t = tokens_BxT.shape
  positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  logits_BxTxV, _ = model.apply({"params": params}, tokens_BxT, positions=positions_BxT,
                                cache=cache)
  ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV[:, :-1], tokens_BxT[:, 1:])
  w_BxT = weights_BxT[:, 1:].astype(jnp.float32)
  return jnp.sum(ce_BxT * w_BxT, axis=1) / jnp.maximum(jnp.sum(w_BxT, axis=1), 1.0)


@functools.partial(jax.jit, static_argnames=("model", "block"))
def block_influence(model, params, tokens_BxT, weights_BxT, *, block: int) -> jax.Array:
  """`[L, B, H, T/block, T/block]`: block-summed |E| of each sequence's response loss."""
  cfg = model.cfg
  b, t = tokens_BxT.shape
  if t % block:
    raise ValueError(f"sequence length {t} must be a multiple of the block size {block}")
  m = t // block

  def loss(probes):
    cache = KVCache(layers=tuple(InfluenceLayout(probes[i], block)
                                 for i in range(cfg.num_layers)), max_len=t)
    # Sequences are independent, so the sum's gradient is each one's own.
    return jnp.sum(response_losses(model, params, tokens_BxT, weights_BxT, cache))

  return jax.grad(loss)(jnp.zeros((cfg.num_layers, b, cfg.num_heads, m, m), jnp.float32))


@functools.partial(jax.jit, static_argnames=("model",))
def masked_loss(model, params, tokens_BxT, weights_BxT, masks_LxHxTxT) -> jax.Array:
  """Mean response loss with every layer's attention under its `[H, T, T]` mask."""
  cfg = model.cfg
  b, t = tokens_BxT.shape
  masks_LxBxHxTxT = jnp.broadcast_to(masks_LxHxTxT[:, None], (cfg.num_layers, b)
                                     + masks_LxHxTxT.shape[1:])
  cache = KVCache(layers=tuple(MaskedLayout(masks_LxBxHxTxT[i]) for i in range(cfg.num_layers)),
                  max_len=t)
  return jnp.mean(response_losses(model, params, tokens_BxT, weights_BxT, cache))
