"""Model registry: `build_model(cfg.model)` returns the flax Module for `cfg.kind`, and
`init_cache(cfg.model, batch, max_len)` the cache that kind declares beside it."""

import flax.linen as nn

from kvjax import registry
from kvjax.config import ModelConfig
from kvjax.layers.cache import Cache
from kvjax.models.block_transformer import BlockTransformer
from kvjax.models.llama import Transformer

MODELS = {"llama": Transformer, "block_transformer": BlockTransformer}


def build_model(cfg: ModelConfig) -> nn.Module:
  registry.validate(cfg)
  return MODELS[cfg.kind](cfg)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> Cache:
  """A zeroed cache for `batch` sequences of up to `max_len` positions (prompt and generated)."""
  return MODELS[cfg.kind].init_cache(cfg, batch, max_len)
