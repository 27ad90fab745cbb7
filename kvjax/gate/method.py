"""Attention-Gate's registry entry: `model.attention_gate.enable` gives every K/V-producing
attention layer a gate as its K/V filter; the cache holds the compacted survivors of its flags
(protocol in_context) or of its scores after a dense prefill (compaction), and the gate's own K/V
while the prompt goes in (and after, when decoded tokens are gated too)."""

from __future__ import annotations

import functools

from kvjax.cache.compact import CompactLayout, compact_layout
from kvjax.cache.dense import dense_layout
from kvjax.cache.sequence import CausalLayout
from kvjax.cache.storage import Storage
from kvjax.config import ModelConfig
from kvjax.gate.layer import AttentionGate
from kvjax.gate.scored import ScoredLayout, scored_layout
from kvjax.method import TOKENS, Method
from kvjax.pallas_kernels.eligibility import TABLE_BLOCK


def _layouts(cfg: ModelConfig, batch: int, max_len: int, impl: str,
             storage: Storage) -> tuple[CompactLayout | ScoredLayout, ...]:
  g = cfg.attention_gate
  state = lambda: dense_layout(batch, max_len, g.num_heads, g.head_dim, storage)
  if g.protocol == "compaction":
    layout = lambda: scored_layout(batch, max_len, cfg.num_kv_heads, cfg.head_dim_, storage,
                                   impl=impl, state=state(), keep_ratio=g.keep_ratio,
                                   recent=g.recent_tokens)
  else:
    layout = lambda: compact_layout(batch, max_len, cfg.num_kv_heads, cfg.head_dim_, storage,
                                    impl=impl, state=state(), gated_decode=g.gate_decode,
                                    recent=g.recent_tokens)
  return tuple(layout() for _ in range(cfg.num_kv_layers))


def _sequence_layouts(cfg: ModelConfig) -> tuple[CausalLayout, ...]:
  return (CausalLayout(recent=cfg.attention_gate.recent_tokens),) * cfg.num_layers


METHOD = Method(
    name="attention_gate", section="attention_gate", key="model.attention_gate.enable",
    role=TOKENS,
    active=lambda cfg: cfg.attention_gate.enable,
    tag=lambda cfg: "gate" + ("/compaction" if cfg.attention_gate.protocol == "compaction" else ""),
    models_why="its gates are trained in a Llama model's attention layers",
    scan_why="its compacted caches differ from layer to layer, so they cannot be stacked "
             "(unroll the layers)",
    shards_kv_heads=False, param_scope=("attn", "filter"), layouts=_layouts,
    sequence_layouts=_sequence_layouts,
    sequence_why=lambda cfg: ("with protocol compaction its cache keeps a fixed count after a "
                              "dense prefill, which a forward pass does not"
                              if cfg.attention_gate.protocol == "compaction" else ""),
    kv_filter=lambda cfg: functools.partial(AttentionGate, cfg),
    kernel=lambda cfg: ("flat", TABLE_BLOCK))
