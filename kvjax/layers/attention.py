"""Multi-head attention with grouped K/V heads (MHA, GQA and MQA are `num_kv_heads` choices).

The layer knows no KV-cache method. It projects queries and (if it owns them) rotated keys and
values, writes them into the layout it is given and attends through it (`kvjax.layers.cache`):
the layout decides what is stored and what each query sees, in training (a full-sequence
layout) as in decoding (a cache). A method that decides which tokens are kept before they are
written comes in as an optional K/V filter submodule (an attention gate).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from kvjax.config import ModelConfig
from kvjax.layers.cache import Chunk, Layout
from kvjax.layers.linear import Linear
from kvjax.layers.rope import apply_rope


def _proj(cfg: ModelConfig, shape: tuple[int, ...], axes: tuple[str, ...], name: str,
          in_dims: int = 1) -> Linear:
  return Linear(shape, axes, in_dims, cfg.init_std, jnp.dtype(cfg.dtype),
                jnp.dtype(cfg.param_dtype), name=name)


class KVProjection(nn.Module):
  """Projects a layer's input to rotated keys and values (what a cache stores)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxE: jax.Array, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    cfg = self.cfg
    shape = (cfg.d_model, cfg.num_kv_heads, cfg.head_dim_)
    k_BxTxKxD = _proj(cfg, shape, ("embed", "kv_heads", "head_dim"), "k")(x_BxTxE)
    v_BxTxKxD = _proj(cfg, shape, ("embed", "kv_heads", "head_dim"), "v")(x_BxTxE)
    k_BxTxKxD = apply_rope(k_BxTxKxD, positions_BxT, cfg.rope_theta)
    return k_BxTxKxD, v_BxTxKxD


class Attention(nn.Module):
  """Self-attention through a layout; `owns_kv=False` makes a layer that reads the K/V of an
  earlier layer (cross-layer sharing) instead of projecting its own.

  kv_filter: makes the submodule `(x_BxTxE, positions_BxT, state) -> (keep_BxTxK, score_BxTxK,
    state)` that flags which of this layer's tokens later queries may see and ranks them; flags
    and scores travel with the chunk, and `state` is what the layout keeps for it between steps
    (`Layout.filter_state`).
  """

  cfg: ModelConfig
  owns_kv: bool = True
  kv_filter: Callable[..., nn.Module] | None = None

  @nn.compact
  def __call__(self, x_BxTxE: jax.Array, positions_BxT: jax.Array, layout: Layout,
               chunk: Chunk | None = None) -> tuple[jax.Array, Chunk, Layout]:
    """Returns `(out_BxTxE, chunk, layout)`: `chunk` is this layer's K/V (or the producer's one
    it was given, for a consumer), `layout` the layout after writing and attending."""
    cfg = self.cfg
    q_BxTxHxD = _proj(cfg, (cfg.d_model, cfg.num_heads, cfg.head_dim_),
                      ("embed", "q_heads", "head_dim"), "q")(x_BxTxE)
    q_BxTxHxD = apply_rope(q_BxTxHxD, positions_BxT, cfg.rope_theta)
    q_BxTxHxD = nn.with_logical_constraint(q_BxTxHxD, ("batch", "length", "q_heads", "head_dim"))
    if self.owns_kv:
      k_BxTxKxD, v_BxTxKxD = KVProjection(cfg, name="kv")(x_BxTxE, positions_BxT)
      keep_BxTxK = score_BxTxK = None
      if self.kv_filter is not None:
        keep_BxTxK, score_BxTxK, state = self.kv_filter(name="filter")(
            x_BxTxE, positions_BxT, layout.filter_state)
        layout = layout.with_filter_state(state)
      chunk = Chunk(k_BxTxKxD, v_BxTxKxD, positions_BxT, keep_BxTxK, score_BxTxK)
      layout = layout.write(chunk)
    out_BxTxHxD, layout = layout.attend(q_BxTxHxD, chunk)
    out_BxTxE = _proj(cfg, (cfg.num_heads, cfg.head_dim_, cfg.d_model),
                      ("q_heads", "head_dim", "embed"), "o", in_dims=2)(out_BxTxHxD)
    return out_BxTxE, chunk, layout
