"""Model registry: `build_model(cfg.model)` returns the flax Module for `cfg.kind`."""

import flax.linen as nn

from kvjax.config import ModelConfig
from kvjax.models.block_transformer import BlockTransformer
from kvjax.models.llama import Transformer

_MODELS = {"llama": Transformer, "block_transformer": BlockTransformer}


def build_model(cfg: ModelConfig) -> nn.Module:
  return _MODELS[cfg.kind](cfg)
