"""MoA's registry entry: `model.moa.plan` names a plan; the cache holds per-head ring buffers,
and whole sequences attend under the plan's windows."""

from __future__ import annotations

from kvjax.config import ModelConfig
from kvjax.method import TOKENS, Method
from kvjax.moa.layout import ring_layouts, window_layouts
from kvjax.moa.plan import load_plan


def _check(cfg: ModelConfig) -> None:
  load_plan(cfg.moa.plan).check(cfg)


METHOD = Method(
    name="moa", section="moa", key="model.moa.plan", role=TOKENS,
    active=lambda cfg: bool(cfg.moa.plan),
    tag=lambda cfg: "moa",
    models_why="a plan gives windows over token positions to a Llama model's heads (the Block "
               "Transformer's decoders attend over blocks, and within one block)",
    scan_why="its ring buffers differ in size from layer to layer, so they cannot be stacked "
             "(unroll the layers)",
    shards_kv_heads=False, check=_check,
    layouts=lambda cfg, batch, max_len, impl, storage: ring_layouts(
        cfg, load_plan(cfg.moa.plan), batch, max_len, impl, storage),
    sequence_layouts=lambda cfg: window_layouts(cfg, load_plan(cfg.moa.plan)),
    kernel=lambda cfg: ("flat", cfg.moa.block_size))
