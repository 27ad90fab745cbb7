"""Cross-layer K/V sharing (CLA, arXiv 2405.12981): which layer's keys and values each layer reads.

A pattern `producer_of[l]` names, for every layer l, the layer whose K/V it attends to. Producers
(`producer_of[p] == p`) project K/V and own a cache buffer; consumers compute only their queries
and read their producer's K/V, so the cache holds one buffer per producer. CLA-s is the pattern
of groups of s adjacent layers; any other valid pattern works too (e.g. the last k layers reusing
the last non-shared layer).
"""

from __future__ import annotations

from kvjax.config import ConfigError, KVSharingConfig


def cla_pattern(factor: int, num_layers: int) -> tuple[int, ...]:
  """Groups of `factor` adjacent layers share their first layer's K/V; the last may be shorter."""
  return tuple(layer - layer % factor for layer in range(num_layers))


def validate_pattern(producer_of: tuple[int, ...], num_layers: int,
                     key: str = "model.kv_sharing.producer_of") -> None:
  """Raises ConfigError naming the first rule `producer_of` breaks."""
  if len(producer_of) != num_layers:
    raise ConfigError(f"{key}: needs one entry per layer (model.num_layers={num_layers}), "
                      f"got {len(producer_of)}")
  for layer, p in enumerate(producer_of):
    if not 0 <= p <= layer:
      raise ConfigError(f"{key}: layer {layer} must read K/V of itself or an earlier layer "
                        f"(0..{layer}), got {p}")
    if layer and p < producer_of[layer - 1]:
      raise ConfigError(f"{key}: must be non-decreasing (groups are runs of adjacent layers), "
                        f"got {p} after {producer_of[layer - 1]} at layer {layer}")
    if producer_of[p] != p:
      raise ConfigError(f"{key}: layer {layer} reads layer {p}, which is not a producer "
                        f"(producer_of[{p}] = {producer_of[p]}, must be {p})")


def resolve_pattern(sharing: KVSharingConfig, num_layers: int) -> tuple[int, ...]:
  """The validated per-layer pattern from `factor` or an explicit `producer_of`."""
  if sharing.producer_of:
    if sharing.factor != 1:
      raise ConfigError("model.kv_sharing: set either factor or producer_of, not both "
                        f"(got factor={sharing.factor} and producer_of={list(sharing.producer_of)})")
    validate_pattern(sharing.producer_of, num_layers)
    return sharing.producer_of
  if not 1 <= sharing.factor <= num_layers:
    raise ConfigError(f"model.kv_sharing.factor: must be in 1..model.num_layers={num_layers}, "
                      f"got {sharing.factor}")
  return cla_pattern(sharing.factor, num_layers)


def uniform_group_size(producer_of: tuple[int, ...]) -> int:
  """s if the pattern is CLA-s with every group full (what a layer scan repeats), else 0."""
  num_layers = len(producer_of)
  s = next((layer for layer, p in enumerate(producer_of) if layer and p == layer), num_layers)
  return s if num_layers % s == 0 and producer_of == cla_pattern(s, num_layers) else 0


def producers(producer_of: tuple[int, ...]) -> tuple[int, ...]:
  """The layers that own K/V, in order; buffer i of the cache belongs to producers[i]."""
  return tuple(layer for layer, p in enumerate(producer_of) if p == layer)


def buffer_of(producer_of: tuple[int, ...]) -> tuple[int, ...]:
  """For every layer, the index of the cache buffer it writes (producer) or reads (consumer)."""
  index = {p: i for i, p in enumerate(producers(producer_of))}
  return tuple(index[p] for p in producer_of)
