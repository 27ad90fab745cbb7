"""Multi-head attention with grouped K/V heads (MHA, GQA and MQA are `num_kv_heads` choices).

The layer is cache-agnostic: a cache layout object supplies `write(k, v, positions)` and
`attend(q, positions)`, so each method's layout (dense, ring buffers, compacted survivors)
brings its own storage and masking while the projections stay here.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kvjax.config import ModelConfig
from kvjax.layers.linear import Linear
from kvjax.layers.rope import apply_rope

NEG_INF = -1e30


def causal_mask(q_pos_BxT: jax.Array, k_pos_BxS: jax.Array) -> jax.Array:
  """Query at position p sees keys at positions <= p."""
  return k_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None]


def dot_product_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                          mask: jax.Array, weights_BxKxTxS: jax.Array | None = None) -> jax.Array:
  """Softmax attention where each K/V head serves H/K query heads; float32 logits.

  `mask` is `[B, T, S]` for all heads, or per head: `[B, K, T, S]` or `[B, H, T, S]`.
  Rows whose mask is all False return zeros rather than NaN.
  `weights_BxKxTxS` (optional, in [0, 1]) rescale the probabilities, which are then
  renormalised: 0/1 weights give the masked result, and a straight-through estimator behind
  them still gets a gradient for the keys they drop (those keep their softmax share).
  """
  b, t, h, d = q_BxTxHxD.shape
  k = k_BxSxKxD.shape[2]
  q_BxTxKxGxD = q_BxTxHxD.reshape(b, t, k, h // k, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  if mask.ndim == 3:
    mask_Bx1x1xTxS = mask[:, None, None]
  else:
    mask_Bx1x1xTxS = mask.reshape(b, k, -1, *mask.shape[2:])  # [B, K, 1 or G, T, S]
  logits = jnp.where(mask_Bx1x1xTxS, logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(mask_Bx1x1xTxS, probs, 0.0)
  if weights_BxKxTxS is not None:
    probs = probs * weights_BxKxTxS[:, :, None]
    probs = probs / jnp.maximum(probs.sum(axis=-1, keepdims=True), 1e-30)
  probs = probs.astype(v_BxSxKxD.dtype)
  out_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxD)
  return out_BxTxKxGxD.reshape(b, t, h, d)


def _proj(cfg: ModelConfig, shape: tuple[int, ...], axes: tuple[str, ...], name: str,
          in_dims: int = 1) -> Linear:
  return Linear(shape, axes, in_dims, cfg.init_std, jnp.dtype(cfg.dtype),
                jnp.dtype(cfg.param_dtype), name=name)


class KVProjection(nn.Module):
  """Projects a layer's input to rotated keys and values (what a cache stores)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    cfg = self.cfg
    shape = (cfg.d_model, cfg.num_kv_heads, cfg.head_dim_)
    k_BxTxKxD = _proj(cfg, shape, ("embed", "kv_heads", "head_dim"), "k")(x_BxTxD)
    v_BxTxKxD = _proj(cfg, shape, ("embed", "kv_heads", "head_dim"), "v")(x_BxTxD)
    k_BxTxKxD = apply_rope(k_BxTxKxD, positions_BxT, cfg.rope_theta)
    return k_BxTxKxD, v_BxTxKxD


class Attention(nn.Module):
  """Self-attention; `owns_kv=False` makes a layer that reads K/V produced elsewhere."""

  cfg: ModelConfig
  owns_kv: bool = True
  layer: int = 0  # index in the stack, for methods with per-layer settings

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, *, kv=None, cache=None):
    """Returns `(out_BxTxD, kv, cache)`.

    kv: `(k_BxTxKxD, v_BxTxKxD)` from a producer layer (used when `owns_kv` is False and
      there is no cache); with `cfg.attention_gate`, also the gate's `keep_BxTxK` flags.
    cache: a layer cache (`write`/`attend`); when given, this layer's K/V are written to it
      (if it owns them) and attention reads the whole cache (`attend` also gets the chunk's own
      K/V, for layouts that do not keep every written token).
    Without a cache, attention is causal over the chunk, or `cfg.moa_plan`'s sparse windows.
    """
    cfg = self.cfg
    q_BxTxHxD = _proj(cfg, (cfg.d_model, cfg.num_heads, cfg.head_dim_),
                      ("embed", "q_heads", "head_dim"), "q")(x_BxTxD)
    q_BxTxHxD = apply_rope(q_BxTxHxD, positions_BxT, cfg.rope_theta)
    q_BxTxHxD = nn.with_logical_constraint(q_BxTxHxD, ("batch", "length", "q_heads", "head_dim"))
    if self.owns_kv:
      kv = KVProjection(cfg, name="kv")(x_BxTxD, positions_BxT)
      if cfg.attention_gate.enable:  # learned eviction: the keep flags travel with the K/V
        from kvjax.gate.layer import AttentionGate  # noqa: PLC0415 (kvjax.gate builds on layers)
        keep_BxTxK, cache = AttentionGate(cfg, name="gate")(x_BxTxD, positions_BxT, cache)
        kv = (*kv, keep_BxTxK)
    if cache is not None:
      if self.owns_kv:
        k_BxTxKxD, v_BxTxKxD, *keep = kv
        cache = cache.write(k_BxTxKxD, v_BxTxKxD, positions_BxT, *keep)
      out_BxTxHxD = cache.attend(q_BxTxHxD, positions_BxT, impl=cfg.attention_impl, kv=kv)
    elif cfg.moa_plan:
      from kvjax.moa.prefill import plan_attention  # noqa: PLC0415 (kvjax.moa builds on layers)
      out_BxTxHxD = plan_attention(cfg, self.layer, q_BxTxHxD, *kv)
    else:
      k_BxTxKxD, v_BxTxKxD, *keep = kv
      mask_BxTxT = causal_mask(positions_BxT, positions_BxT)
      weights = None
      if keep:
        from kvjax.gate.layer import visible_weights  # noqa: PLC0415
        weights = visible_weights(keep[0], positions_BxT, positions_BxT)
      out_BxTxHxD = dot_product_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, mask_BxTxT, weights)
    out_BxTxD = _proj(cfg, (cfg.num_heads, cfg.head_dim_, cfg.d_model),
                      ("q_heads", "head_dim", "embed"), "o", in_dims=2)(out_BxTxHxD)
    return out_BxTxD, kv, cache
