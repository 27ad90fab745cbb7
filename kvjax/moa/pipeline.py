"""Profile -> search -> validate: a plan for a model from its own calibration data."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from kvjax.moa import search
from kvjax.moa.masks import prefill_mask
from kvjax.moa.plan import Plan
from kvjax.moa.profile import block_influence, masked_loss


def mean_influence(model, params, tokens_BxT, weights_BxT, *, block: int,
                   progress: Callable = lambda x: x) -> np.ndarray:
  """`[L, H, M, M]` block influence averaged over the samples (one at a time, for memory)."""
  total = 0.0
  for i in progress(range(len(tokens_BxT))):
    e = block_influence(model, params, tokens_BxT[i:i + 1], weights_BxT[i:i + 1], block=block)
    total = total + jax.device_get(e[:, 0])
  return total / len(tokens_BxT)


def plan_masks(plan: Plan, n: int, block: int, sink: int) -> np.ndarray:
  """`[L, H, N, N]` prefill masks of `plan` at length `n`."""
  sizes_LxH = plan.cache_sizes(n, block)
  return np.stack([prefill_mask(n, -(-(row - sink) // block), block, sink) for row in sizes_LxH])


def validation_loss(model, params, plan: Plan, data: dict[int, tuple[np.ndarray, np.ndarray]],
                    *, block: int, sink: int) -> float:
  """Mean response loss over lengths under `plan`'s masks."""
  return float(np.mean([masked_loss(model, params, tokens, weights,
                                    plan_masks(plan, n, block, sink))
                        for n, (tokens, weights) in data.items()]))


def search_plan(model, params, influence: dict[int, np.ndarray],
                validation: dict[int, tuple[np.ndarray, np.ndarray]], *, budget: float,
                alphas: Sequence[float], betas: Sequence[float], max_rules: int,
                progress: Callable = lambda x: x) -> tuple[Plan, list[dict]]:
  """The candidate with the lowest validation loss, and a record of every candidate."""
  cfg = model.cfg
  rules = search.rule_grid(alphas, betas, sorted(influence))
  space = search.build_space(influence, rules, num_kv_heads=cfg.num_kv_heads,
                             block=cfg.moa.block_size, sink=cfg.moa.sink_tokens)
  records = []
  for choice in progress(search.candidates(space, budget=budget, max_rules=max_rules)):
    plan = search.to_plan(space, choice, cfg.num_heads)
    records.append({
        "plan": plan,
        "profiled_loss": dict(zip(space.lengths, search.loss_of(space, choice).tolist())),
        "density": dict(zip(space.lengths, search.density_of(space, choice).tolist())),
        "validation_loss": validation_loss(model, params, plan, validation,
                                           block=cfg.moa.block_size, sink=cfg.moa.sink_tokens)})
  best = min(records, key=lambda r: r["validation_loss"])
  return best["plan"], records
