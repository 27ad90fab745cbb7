"""Score-based eviction's registry entry: `model.eviction.policy` keeps `keep_ratio` of the
prompt per (layer, K/V head) in a compacted cache, chosen after a dense prefill (`compaction`)
or while the prompt goes in (`in_context`). On a Block Transformer it compacts the block
decoder's cache (the token decoder's holds one block)."""

from __future__ import annotations

from kvjax.cache.storage import Storage
from kvjax.config import ModelConfig
from kvjax.errors import ConfigError
from kvjax.eviction.layout import EvictionLayout, eviction_layout
from kvjax.layers.kv_sharing import readers
from kvjax.method import TOKENS, Method
from kvjax.pallas_kernels.eligibility import TABLE_BLOCK


def _layouts(cfg: ModelConfig, batch: int, max_len: int, impl: str,
             storage: Storage) -> tuple[EvictionLayout, ...]:
  e = cfg.eviction
  return tuple(eviction_layout(batch, max_len, cfg.num_kv_heads, cfg.head_dim_, storage,
                               policy=e.policy, keep_ratio=e.keep_ratio, readers=len(layers),
                               impl=impl, in_context=e.protocol == "in_context")
               for layers in readers(cfg.producer_of))


def _check(cfg: ModelConfig) -> None:
  """In context, every query of a buffer evicts from it: one reader per buffer, token level."""
  if cfg.eviction.protocol != "in_context":
    return
  if cfg.kind != "llama":
    raise ConfigError(f"model.eviction.protocol: in_context needs model.kind 'llama', got "
                      f"{cfg.kind!r} (a Block Transformer compacts: use compaction)")
  if cfg.num_kv_layers != cfg.num_layers:
    raise ConfigError("model.eviction.protocol: in_context needs every layer to own its K/V "
                      "(no model.kv_sharing): the readers of a shared buffer would each evict "
                      "from it (use compaction)")


def _tag(cfg: ModelConfig) -> str:
  e = cfg.eviction
  return f"{e.policy}@{e.keep_ratio:g}" + ("/in_context" if e.protocol == "in_context" else "")


METHOD = Method(
    name="eviction", section="eviction", key="model.eviction.policy", role=TOKENS,
    active=lambda cfg: cfg.eviction.policy != "none", tag=_tag,
    models=("llama", "block_transformer"),
    scan_why="its prefill buffers and compacted caches are per layer (unroll the layers)",
    shards_kv_heads=False, check=_check, layouts=_layouts, kernel=lambda cfg: ("flat", TABLE_BLOCK),
    sequence_why=lambda cfg: "it evicts after a dense prefill or while the prompt goes in, so a "
                             "forward pass attends to every token")
