"""The Block Transformer's two-level cache.

- `blocks`: a dense cache over block positions for the block decoder: slot 0 holds the start
  embedding, slot i + 1 block i. Per token it holds 1/L of an entry, and each block decoder
  step reads 1/L of the entries a token-level cache would.
- `local`: the token decoder's cache, R + L - 1 slots (R prefix vectors, then the tokens of the
  current block before its last), independent of the sequence length. Every block rewrites it
  from slot 0; the causal mask by slot hides what is left of the previous block.

Positions arrive in the prompt's own coordinates; `shift` (pad tokens put before each prompt so
that it ends at a block boundary) maps them onto blocks.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from kvjax.config import ModelConfig
from kvjax.decode.cache import KVCache, init_cache, tree_nbytes


@flax.struct.dataclass
class BlockCache:
  blocks: KVCache  # block decoder, one slot per block position
  local: KVCache  # token decoder, R + L - 1 slots
  block_tokens: jax.Array  # B x L int32, the current block's tokens so far
  shift: jax.Array  # B int32, pad tokens before the prompt
  max_len: int = flax.struct.field(pytree_node=False)  # positions (prompt + generated) it holds

  @property
  def nbytes(self) -> int:
    return tree_nbytes(self)


def init_block_cache(cfg: ModelConfig, batch: int, max_len: int) -> BlockCache:
  """A fresh cache for `batch` sequences of up to `max_len` prompt and generated tokens."""
  if max_len > cfg.max_seq_len:
    raise ValueError(f"cache max_len={max_len} exceeds model.max_seq_len={cfg.max_seq_len}")
  block, token_cfg = cfg.block, cfg.decoder("token_decoder")
  return BlockCache(
      blocks=init_cache(cfg.decoder("block_decoder"), batch, block.num_block_positions(max_len)),
      local=init_cache(token_cfg, batch, token_cfg.max_seq_len),
      block_tokens=jnp.full((batch, block.block_len), block.pad_id, jnp.int32),
      shift=jnp.zeros((batch,), jnp.int32),
      max_len=max_len)
