"""Cross-layer K/V sharing (CLA, arXiv 2405.12981) in the model: which buffer each layer uses.

The pattern `producer_of` (resolved and validated once by `ModelConfig`) names, for every layer,
the layer whose K/V it attends to. Producers project K/V and own a cache buffer; consumers read
their producer's, so the cache holds one buffer per producer.
"""

from __future__ import annotations

from kvjax.config import ModelConfig
from kvjax.errors import ConfigError
from kvjax.method import LAYERS, Method


def producers(producer_of: tuple[int, ...]) -> tuple[int, ...]:
  """The layers that own K/V, in order; buffer i of the cache belongs to producers[i]."""
  return tuple(layer for layer, p in enumerate(producer_of) if p == layer)


def buffer_of(producer_of: tuple[int, ...]) -> tuple[int, ...]:
  """For every layer, the index of the cache buffer it writes (producer) or reads (consumer)."""
  index = {p: i for i, p in enumerate(producers(producer_of))}
  return tuple(index[p] for p in producer_of)


def readers(producer_of: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
  """For every producer, in order, the layers that read its buffer (itself first)."""
  return tuple(tuple(layer for layer, p in enumerate(producer_of) if p == producer)
               for producer in producers(producer_of))


def _check_scan(cfg: ModelConfig) -> None:
  if cfg.scan_layers and not cfg.scan_group_size:
    raise ConfigError("model.scan_layers: needs every layer group (a producer and its consumers) "
                      "to be the same size, i.e. kv_sharing.factor dividing model.num_layers or "
                      f"the same pattern as one, got producer_of={list(cfg.producer_of)}")


METHOD = Method(
    name="cla", section="kv_sharing", key="model.kv_sharing", role=LAYERS,
    active=lambda cfg: cfg.num_kv_layers < cfg.num_layers,
    tag=lambda cfg: f"cla[{cfg.num_kv_layers}of{cfg.num_layers}]",  # layers that own K/V
    models=("llama", "block_transformer"), scan=True, check=_check_scan)
