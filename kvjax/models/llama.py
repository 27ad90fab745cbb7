"""Llama-style decoder: pre-norm blocks of attention and SwiGLU, tied or untied embeddings."""

from __future__ import annotations

import operator
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from kvjax import registry
from kvjax.cache.dense import stacked_cache
from kvjax.cache.sequence import CausalLayout
from kvjax.config import ModelConfig
from kvjax.layers import kv_sharing
from kvjax.layers.attention import Attention
from kvjax.layers.cache import Cache, Chunk, KVCache, Layout
from kvjax.layers.linear import Linear, contract
from kvjax.layers.mlp import SwiGLU
from kvjax.layers.norms import RMSNorm


class DecoderBlock(nn.Module):
  cfg: ModelConfig
  owns_kv: bool = True
  kv_filter: Callable[..., nn.Module] | None = None

  @nn.compact
  def __call__(self, x_BxTxE: jax.Array, positions_BxT: jax.Array, layout: Layout,
               chunk: Chunk | None = None) -> tuple[jax.Array, Chunk, Layout]:
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype),
                                name=name)
    h_BxTxE, chunk, layout = Attention(cfg, self.owns_kv, self.kv_filter, name="attn")(
        norm("attn_norm")(x_BxTxE), positions_BxT, layout, chunk)
    x_BxTxE = x_BxTxE + h_BxTxE
    x_BxTxE = x_BxTxE + SwiGLU(cfg.mlp_dim, cfg.init_std, jnp.dtype(cfg.dtype),
                               jnp.dtype(cfg.param_dtype), name="mlp")(norm("mlp_norm")(x_BxTxE))
    x_BxTxE = nn.with_logical_constraint(x_BxTxE, ("batch", "length", "embed"))
    return x_BxTxE, chunk, layout


class LayerGroup(nn.Module):
  """A producer and the consumers that read its K/V: the unit that `scan_layers` repeats.

  Written as a scan body: `carry = (x_BxTxE, cache)`, with `cache` a `StackedKVCache` (or None:
  causal attention within the sequence) of which this group uses buffer `group`.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, positions_BxT, group):
    x_BxTxE, cache = carry
    layout = CausalLayout() if cache is None else cache.layer(group)
    chunk = None
    for j in range(self.cfg.scan_group_size):
      x_BxTxE, chunk, layout = DecoderBlock(self.cfg, owns_kv=j == 0, name=f"layer_{j}")(
          x_BxTxE, positions_BxT, layout, chunk)
    return (x_BxTxE, None if cache is None else layout.stack), None


class Embedder(nn.Module):
  """Token embedding, and the LM head (the same table when embeddings are tied)."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed"))
    self.table = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init,
                          dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    if not cfg.tie_embeddings:
      self.head = Linear((cfg.d_model, cfg.vocab_size), ("embed", "vocab"), 1, cfg.init_std,
                         jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype))

  def encode(self, tokens_BxT):
    return self.table(tokens_BxT)

  def decode(self, x_BxTxE):
    """float32 logits."""
    kernel_ExV = self.table.embedding.T if self.cfg.tie_embeddings else self.head.kernel
    return contract(x_BxTxE, kernel_ExV, 1, jnp.dtype(self.cfg.dtype))


class Transformer(nn.Module):
  """Decoder-only LM.

  `apply(params, tokens)` returns logits; `apply(params, tokens, positions=, cache=)` returns
  `(logits, cache)` for prefill and decode steps. Logits are float32, `[B, T, V]`, or `[B, T', V]`
  at the token indices `logits_at` (`[B, T']`) names: the LM head is a large share of a
  prefill's work and memory, and generation needs only each prompt's last position. Layers
  share K/V as `cfg.producer_of` says (cross-layer attention); the cache holds one layout per
  producer.
  """

  cfg: ModelConfig

  @staticmethod
  def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> Cache:
    """A fresh cache for `batch` sequences of up to `max_len` positions (prompt and generated):
    the layouts of `cfg`'s methods, or a stack of dense buffers for scanned layers."""
    if max_len > cfg.max_seq_len:
      raise ValueError(f"cache max_len={max_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    registry.validate(cfg)
    if cfg.scan_layers:
      return stacked_cache(cfg.num_kv_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim_,
                           registry.storage(cfg), registry.attention_impl(cfg))
    return KVCache(layers=registry.layouts(cfg, batch, max_len), max_len=max_len)

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, positions: jax.Array | None = None, cache=None,
               logits_at: jax.Array | None = None):
    cfg = self.cfg
    b, t = tokens_BxT.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    embedder = Embedder(cfg, name="embed")
    x_BxTxE = embedder.encode(tokens_BxT)
    x_BxTxE = nn.with_logical_constraint(x_BxTxE, ("batch", "length", "embed"))
    x_BxTxE, cache = self._blocks(x_BxTxE, positions, cache)
    if logits_at is not None:
      x_BxTxE = jnp.take_along_axis(x_BxTxE, logits_at[..., None], axis=1)
    x_BxTxE = RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype),
                      name="final_norm")(x_BxTxE)
    logits_BxTxV = embedder.decode(x_BxTxE)
    if cache is None:
      return logits_BxTxV
    return logits_BxTxV, cache

  def _blocks(self, x_BxTxE, positions_BxT, cache):
    """Runs the layers in order, so a producer's K/V exist before its consumers read them:
    passed along as the producer's chunk, and through its layout (written, then read). Without
    a cache every layer attends through its method's whole-sequence layout."""
    cfg = self.cfg
    if cfg.scan_layers:
      groups = cfg.num_layers // cfg.scan_group_size
      group = nn.remat(LayerGroup, prevent_cse=False) if cfg.remat else LayerGroup
      scan = nn.scan(group, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast, 0), length=groups,
                     metadata_params={nn.PARTITION_NAME: "layers"})
      (x_BxTxE, cache), _ = scan(cfg, name="layers")(
          (x_BxTxE, cache), positions_BxT, jnp.arange(groups, dtype=jnp.int32))
      return x_BxTxE, cache
    producer_of = cfg.producer_of
    buffer_of = kv_sharing.buffer_of(producer_of)
    layouts = list(registry.sequence_layouts(cfg) if cache is None else cache.layers)
    kv_filter = registry.kv_filter(cfg)
    block = nn.remat(DecoderBlock) if cfg.remat else DecoderBlock
    chunks = {}
    for i, p in enumerate(producer_of):
      slot = i if cache is None else buffer_of[i]
      x_BxTxE, chunks[i], layout = block(
          cfg, owns_kv=p == i, kv_filter=kv_filter if p == i else None, name=f"layer_{i}")(
              x_BxTxE, positions_BxT, layouts[slot].for_layer(i), chunks.get(p))
      layouts[slot] = layout.for_layer(p)
    return x_BxTxE, None if cache is None else cache.replace(layers=tuple(layouts))


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
