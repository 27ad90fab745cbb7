"""Attention-Gate (arXiv 2410.12876): learned in-context K/V eviction, and the score-based
eviction baselines it is compared with, all on the compacted cache of `kvjax.decode.compact_cache`.
"""

from kvjax.gate.baselines import BASELINES, baseline_keep
from kvjax.gate.layer import (AttentionGate, eviction_loss, is_gate_param, straight_through,
                              visible_weights)

__all__ = ["BASELINES", "AttentionGate", "baseline_keep", "eviction_loss", "is_gate_param",
           "straight_through", "visible_weights"]
