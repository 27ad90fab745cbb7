"""Dense KV cache: one `[B, S, K, D]` buffer pair per layer that owns K/V.

Slot s holds the token at position s, so the causal mask is just `slot <= query position`.
Prompts of different lengths are right-padded: a pad token's slot is overwritten by the
first generated token of that sequence before any query can see it.

With scanned layers (`model.scan_layers`) the producers' buffers are one `[G, B, S, K, D]`
stack that the scan carries: group g writes its new rows in place at index g, so a decode step
moves only those rows instead of slicing out and restacking the whole cache.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from kvjax.config import ModelConfig
from kvjax.layers.attention import causal_mask, dot_product_attention


def resolve_impl(impl: str) -> str:
  """`auto` means the Pallas kernels on GPU/TPU and the jnp reference elsewhere."""
  if impl == "auto":
    return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
  return impl


def tree_nbytes(tree) -> int:
  """Bytes held by every array (or ShapeDtypeStruct) leaf of a pytree."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _write_rows(buf_BxSxKxD: jax.Array, new_BxTxKxD: jax.Array, start_B: jax.Array) -> jax.Array:
  def one(buf, new, start):
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (start, 0, 0))
  return jax.vmap(one)(buf_BxSxKxD, new_BxTxKxD, start_B)


def _write_stacked_rows(buf_GxBxSxKxD: jax.Array, new_BxTxKxD: jax.Array, start_B: jax.Array,
                        index: jax.Array) -> jax.Array:
  """One scatter into buffer `index` of the stack (a vmap over its batch axis would transpose
  the whole stack)."""
  b, t = new_BxTxKxD.shape[:2]
  slots_BxT = start_B[:, None] + jnp.arange(t, dtype=start_B.dtype)
  return buf_GxBxSxKxD.at[index, jnp.arange(b)[:, None], slots_BxT].set(
      new_BxTxKxD.astype(buf_GxBxSxKxD.dtype), mode="drop")


@flax.struct.dataclass
class DenseLayerCache:
  k: jax.Array  # B x S x K x D, rotated keys
  v: jax.Array  # B x S x K x D

  @property
  def max_len(self) -> int:
    return self.k.shape[1]

  @property
  def nbytes(self) -> int:
    return tree_nbytes(self)

  def write(self, k_BxTxKxD, v_BxTxKxD, positions_BxT) -> DenseLayerCache:
    """Stores a chunk of consecutive positions per sequence (prefill or one decode step)."""
    start_B = positions_BxT[:, 0]
    return DenseLayerCache(k=_write_rows(self.k, k_BxTxKxD, start_B),
                           v=_write_rows(self.v, v_BxTxKxD, start_B))

  def attend(self, q_BxTxHxD, positions_BxT, impl: str = "auto", kv=None) -> jax.Array:
    del kv  # the chunk's K/V were written here and are read back like every other slot
    if q_BxTxHxD.shape[1] == 1 and resolve_impl(impl) == "pallas":
      from kvjax.pallas_kernels.shared_kv_decode import shared_kv_decode  # noqa: PLC0415
      out_BxHxD = shared_kv_decode(q_BxTxHxD[:, 0], self.k, self.v, positions_BxT[:, 0] + 1)
      return out_BxHxD[:, None]
    b = q_BxTxHxD.shape[0]
    slots_BxS = jnp.broadcast_to(jnp.arange(self.max_len, dtype=jnp.int32), (b, self.max_len))
    return dot_product_attention(q_BxTxHxD, self.k, self.v, causal_mask(positions_BxT, slots_BxS))


@flax.struct.dataclass
class KVCache:
  """The model's cache: one layer cache per layer that owns K/V."""

  layers: tuple

  @property
  def nbytes(self) -> int:
    return sum(layer.nbytes for layer in self.layers)

  @property
  def max_len(self) -> int:
    return self.layers[0].max_len


@flax.struct.dataclass
class StackedKVCache:
  """Every producer's dense buffers stacked on a leading axis, for scanned layers."""

  k: jax.Array  # G x B x S x K x D, rotated keys
  v: jax.Array  # G x B x S x K x D

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  @property
  def nbytes(self) -> int:
    return tree_nbytes(self)

  def layer(self, index: jax.Array) -> StackedLayerCache:
    return StackedLayerCache(stack=self, index=index)


@flax.struct.dataclass
class StackedLayerCache:
  """Buffer `index` of a stack, with the layer cache interface; `stack` is the updated whole."""

  stack: StackedKVCache
  index: jax.Array  # int32 scalar, the group's place in the scan

  def write(self, k_BxTxKxD, v_BxTxKxD, positions_BxT) -> StackedLayerCache:
    start_B = positions_BxT[:, 0]
    return self.replace(stack=StackedKVCache(
        k=_write_stacked_rows(self.stack.k, k_BxTxKxD, start_B, self.index),
        v=_write_stacked_rows(self.stack.v, v_BxTxKxD, start_B, self.index)))

  def attend(self, q_BxTxHxD, positions_BxT, impl: str = "auto", kv=None) -> jax.Array:
    take = lambda buf: jax.lax.dynamic_index_in_dim(buf, self.index, keepdims=False)
    layer = DenseLayerCache(k=take(self.stack.k), v=take(self.stack.v))
    return layer.attend(q_BxTxHxD, positions_BxT, impl, kv)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
  """A zeroed dense cache for `batch` sequences of up to `max_len` positions (or the
  two-level cache of a Block Transformer, or the compacted one of an attention gate)."""
  if cfg.kind == "block_transformer":
    from kvjax.decode.block_cache import init_block_cache  # noqa: PLC0415 (builds on this module)
    return init_block_cache(cfg, batch, max_len)
  if max_len > cfg.max_seq_len:
    raise ValueError(f"cache max_len={max_len} exceeds model.max_seq_len={cfg.max_seq_len}")
  if cfg.attention_gate.enable:
    from kvjax.decode.compact_cache import init_compact_cache  # noqa: PLC0415 (builds on this)
    return init_compact_cache(cfg, batch, max_len)
  if cfg.moa_plan:
    from kvjax.decode.moa_cache import init_moa_cache  # noqa: PLC0415 (builds on this module)
    return init_moa_cache(cfg, batch, max_len)
  if cfg.eviction.policy != "none":
    from kvjax.decode.eviction import init_eviction_cache  # noqa: PLC0415 (builds on this module)
    return init_eviction_cache(cfg, batch, max_len)
  shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim_)
  dtype = jnp.dtype(cfg.cache_dtype)
  if cfg.scan_layers:
    stacked = (cfg.num_kv_layers, *shape)
    return StackedKVCache(k=jnp.zeros(stacked, dtype), v=jnp.zeros(stacked, dtype))
  return KVCache(layers=tuple(
      DenseLayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
      for _ in range(cfg.num_kv_layers)))
