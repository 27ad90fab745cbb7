"""Llama-style decoder: pre-norm blocks of attention and SwiGLU, tied or untied embeddings."""

from __future__ import annotations

import operator

import flax.linen as nn
import jax
import jax.numpy as jnp

from kvjax.config import ModelConfig
from kvjax.layers import kv_sharing
from kvjax.layers.attention import Attention
from kvjax.layers.mlp import SwiGLU
from kvjax.layers.norms import RMSNorm


class DecoderBlock(nn.Module):
  cfg: ModelConfig
  owns_kv: bool = True
  layer: int = 0

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, kv=None, cache=None):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype),
                                name=name)
    h_BxTxD, kv, cache = Attention(cfg, self.owns_kv, self.layer, name="attn")(
        norm("attn_norm")(x_BxTxD), positions_BxT, kv=kv, cache=cache)
    x_BxTxD = x_BxTxD + h_BxTxD
    x_BxTxD = x_BxTxD + SwiGLU(cfg.mlp_dim, cfg.init_std, jnp.dtype(cfg.dtype),
                               jnp.dtype(cfg.param_dtype), name="mlp")(norm("mlp_norm")(x_BxTxD))
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))
    return x_BxTxD, kv, cache


class LayerGroup(nn.Module):
  """A producer and the consumers that read its K/V: the unit that `scan_layers` repeats.

  Written as a scan body: `carry = (x_BxTxD, cache)`, with `cache` a `StackedKVCache` (or None)
  of which this group uses buffer `group`.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, positions_BxT, group):
    x_BxTxD, cache = carry
    layer_cache = None if cache is None else cache.layer(group)
    kv = None
    for j in range(self.cfg.scan_group_size):
      x_BxTxD, kv, layer_cache = DecoderBlock(self.cfg, owns_kv=j == 0, name=f"layer_{j}")(
          x_BxTxD, positions_BxT, kv, layer_cache)
    return (x_BxTxD, None if cache is None else layer_cache.stack), None


class Embedder(nn.Module):
  """Token embedding, and the LM head (the same table when embeddings are tied)."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed"))
    self.table = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init,
                          dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    if not cfg.tie_embeddings:
      head_init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                               ("embed", "vocab"))
      self.head = nn.Dense(cfg.vocab_size, use_bias=False, kernel_init=head_init,
                           dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))

  def encode(self, tokens_BxT):
    return self.table(tokens_BxT)

  def decode(self, x_BxTxD):
    if self.cfg.tie_embeddings:
      return self.table.attend(x_BxTxD)
    return self.head(x_BxTxD)


class Transformer(nn.Module):
  """Decoder-only LM.

  `apply(params, tokens)` returns logits; `apply(params, tokens, positions=, cache=)` returns
  `(logits, cache)` for prefill and decode steps. Logits are float32. Layers share K/V as
  `cfg.producer_of` says (cross-layer attention); the cache holds one buffer per producer.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, positions: jax.Array | None = None, cache=None):
    cfg = self.cfg
    b, t = tokens_BxT.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    embedder = Embedder(cfg, name="embed")
    x_BxTxD = embedder.encode(tokens_BxT)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))
    x_BxTxD, cache = self._blocks(x_BxTxD, positions, cache)
    x_BxTxD = RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype),
                      name="final_norm")(x_BxTxD)
    logits_BxTxV = embedder.decode(x_BxTxD).astype(jnp.float32)
    if cache is None:
      return logits_BxTxV
    return logits_BxTxV, cache

  def _blocks(self, x_BxTxD, positions_BxT, cache):
    """Runs the layers in order, so a producer's K/V exist before its consumers read them:
    passed along in the forward pass, or through its cache buffer (written, then read)."""
    cfg = self.cfg
    if cfg.scan_layers:
      groups = cfg.num_layers // cfg.scan_group_size
      group = nn.remat(LayerGroup, prevent_cse=False) if cfg.remat else LayerGroup
      scan = nn.scan(group, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast, 0), length=groups,
                     metadata_params={nn.PARTITION_NAME: "layers"})
      (x_BxTxD, cache), _ = scan(cfg, name="layers")(
          (x_BxTxD, cache), positions_BxT, jnp.arange(groups, dtype=jnp.int32))
      return x_BxTxD, cache
    producer_of = cfg.producer_of
    buffer_of = kv_sharing.buffer_of(producer_of)
    buffers = None if cache is None else list(cache.layers)
    kv_of = {}
    block = nn.remat(DecoderBlock) if cfg.remat else DecoderBlock
    for i, p in enumerate(producer_of):
      layer_cache = None if cache is None else buffers[buffer_of[i]]
      x_BxTxD, kv, layer_cache = block(cfg, owns_kv=p == i, layer=i, name=f"layer_{i}")(
          x_BxTxD, positions_BxT, kv_of.get(p), layer_cache)
      kv_of[i] = kv
      if cache is not None:
        buffers[buffer_of[i]] = layer_cache
    return x_BxTxD, None if cache is None else cache.replace(layers=tuple(buffers))


def stack_layers(params: dict, cfg: ModelConfig) -> dict:
  """Unrolled parameters (`layer_0`, `layer_1`, ...) -> the `scan_layers` layout of the same
  model (`layers/layer_j` with a leading group axis): checkpoints move between the two.
  Returns plain arrays (partitioning boxes are dropped)."""
  params, size = nn.meta.unbox(params), cfg.scan_group_size
  rest = {k: v for k, v in params.items() if not k.startswith("layer_")}
  groups = range(cfg.num_layers // size)
  stacked = {f"layer_{j}": jax.tree.map(lambda *g: jnp.stack(g),
                                        *(params[f"layer_{g * size + j}"] for g in groups))
             for j in range(size)}
  return {**rest, "layers": stacked}


def unstack_layers(params: dict, cfg: ModelConfig) -> dict:
  """The inverse of `stack_layers`."""
  params, size = nn.meta.unbox(params), cfg.scan_group_size
  out = {k: v for k, v in params.items() if k != "layers"}
  for j in range(size):
    for g in range(cfg.num_layers // size):
      out[f"layer_{g * size + j}"] = jax.tree.map(operator.itemgetter(g),
                                                  params["layers"][f"layer_{j}"])
  return out
