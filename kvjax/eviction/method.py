"""Score-based eviction's registry entry: `model.eviction.policy` prefills densely while keys
are scored, then keeps `keep_ratio` of the prompt per (layer, K/V head) in a compacted cache.
On a Block Transformer it compacts the block decoder's cache (the token decoder's holds one
block)."""

from __future__ import annotations

from kvjax.cache.storage import Storage
from kvjax.config import ModelConfig
from kvjax.eviction.layout import EvictionLayout, eviction_layout
from kvjax.layers.kv_sharing import readers
from kvjax.method import TOKENS, Method
from kvjax.pallas_kernels.eligibility import TABLE_BLOCK


def _layouts(cfg: ModelConfig, batch: int, max_len: int, impl: str,
             storage: Storage) -> tuple[EvictionLayout, ...]:
  e = cfg.eviction
  return tuple(eviction_layout(batch, max_len, cfg.num_kv_heads, cfg.head_dim_, storage,
                               policy=e.policy, keep_ratio=e.keep_ratio, readers=len(layers),
                               impl=impl)
               for layers in readers(cfg.producer_of))


METHOD = Method(
    name="eviction", section="eviction", key="model.eviction.policy", role=TOKENS,
    active=lambda cfg: cfg.eviction.policy != "none",
    tag=lambda cfg: f"{cfg.eviction.policy}@{cfg.eviction.keep_ratio:g}",
    models=("llama", "block_transformer"),
    scan_why="its prefill buffers and compacted caches are per layer (unroll the layers)",
    shards_kv_heads=False, layouts=_layouts, kernel=lambda cfg: ("flat", TABLE_BLOCK),
    sequence_why=lambda cfg: "it evicts after a dense prefill, so a forward pass attends to "
                             "every token")
