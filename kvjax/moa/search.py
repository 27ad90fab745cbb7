"""Plan search: one elastic rule per head minimising the profiled loss under density bounds.

A rule r = (alpha, beta) at length N keeps `cache_size(alpha + beta * N)` tokens per head; its
loss for a head is the profiled influence of the causal blocks its prefill mask drops. Rules are
chosen per KV head (the query heads of a GQA group share a cache, so they share a rule; their
losses add). A mixed-integer program (scipy's HiGHS) picks them with, at every profiled length,
mean density in [0.9 * budget, budget] and at most `max_rules` distinct rules per layer.
Lengths are traded off by epsilon-constraints: minimise one length's loss while every other
stays within (1 + eps) of its own optimum; validation loss picks among the candidates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import optimize, sparse

from kvjax.moa.plan import Plan, cache_size


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  rules: np.ndarray  # R x 2: (alpha, beta)
  lengths: tuple[int, ...]
  loss_UxKxZ: np.ndarray  # per length, per (layer, KV head) in order, per rule
  density_UxZ: np.ndarray  # kept fraction of the KV cache
  num_layers: int


def rule_grid(alphas: Sequence[float], betas: Sequence[float],
              lengths: Sequence[int]) -> np.ndarray:
  """All (alpha, beta) pairs whose span is > 0 at the shortest length and <= N at the longest."""
  rules = np.array([(a, b) for a in alphas for b in betas], float)
  span = lambda n: rules[:, 0] + rules[:, 1] * n
  keep = (span(min(lengths)) > 0) & (span(max(lengths)) <= max(lengths))
  return rules[keep]


def dropped_blocks(num_local: int, m: int) -> np.ndarray:
  """`[M, M]` causal key blocks outside the sink block and the local band."""
  i = np.arange(m)[:, None]
  j = np.arange(m)[None, :]
  return (j <= i) & (j > 0) & (j <= i - num_local)


def build_space(influence: dict[int, np.ndarray], rules: np.ndarray, *, num_kv_heads: int,
                block: int, sink: int) -> SearchSpace:
  """`influence[N]`: `[L, H, M, M]` block influence averaged over samples of length N."""
  lengths = tuple(sorted(influence))
  losses, densities = [], []
  for n in lengths:
    e_LxHxMxM = influence[n]
    layers, heads, m, _ = e_LxHxMxM.shape
    size_Z = cache_size(np.floor(rules[:, 0] + rules[:, 1] * n).astype(np.int64), n, block)
    num_local_Z = -(-(size_Z - sink) // block)
    dropped_ZxMxM = np.stack([dropped_blocks(int(nl), m) for nl in num_local_Z])
    loss_LxHxZ = np.einsum("lhij,rij->lhr", e_LxHxMxM, dropped_ZxMxM.astype(float))
    g = heads // num_kv_heads
    losses.append(loss_LxHxZ.reshape(layers, num_kv_heads, g, -1).sum(axis=2)
                  .reshape(layers * num_kv_heads, -1))
    densities.append(np.minimum(size_Z, n) / n)
  return SearchSpace(rules, lengths, np.stack(losses), np.stack(densities), layers)


class InfeasibleBudget(ValueError):
  """No choice of rules meets the density bounds at every profiled length."""


def infeasible(budget: float) -> InfeasibleBudget:
  return InfeasibleBudget(f"no plan meets the density bounds [{0.9 * budget:.3g}, {budget:.3g}] "
                          f"at every length with these rules; widen the rule grid or the budget")


def check_feasible(rules: np.ndarray, lengths: Sequence[int], *, num_layers: int,
                   num_kv_heads: int, block: int, sink: int, budget: float,
                   max_rules: int) -> None:
  """Raises `InfeasibleBudget` before any profiling when densities alone rule every plan out
  (the constraints do not depend on the losses)."""
  if len(rules) == 0:
    raise InfeasibleBudget(f"the rule grid has no rule whose span is > 0 at {min(lengths)} "
                           f"tokens and <= {max(lengths)} at {max(lengths)}")
  zero = {n: np.zeros((num_layers, num_kv_heads, n // block, n // block)) for n in lengths}
  space = build_space(zero, rules, num_kv_heads=num_kv_heads, block=block, sink=sink)
  if solve(space, budget=budget, max_rules=max_rules, weights=np.zeros(len(lengths))) is None:
    raise infeasible(budget)


def solve(space: SearchSpace, *, budget: float, max_rules: int, weights: np.ndarray,
          caps: np.ndarray | None = None, time_limit: float = 60.0) -> np.ndarray | None:
  """Rule index per (layer, KV head) minimising `sum_U weights[U] * loss_U`, with
  `loss_U <= caps[U]` where given; None if infeasible."""
  n_len, n_heads, n_rules = space.loss_UxKxZ.shape
  per_layer = n_heads // space.num_layers
  nx, ny = n_heads * n_rules, space.num_layers * n_rules
  c = np.concatenate([np.einsum("n,nkr->kr", weights, space.loss_UxKxZ).ravel(), np.zeros(ny)])
  rows, lo, hi = [], [], []

  def add(row, lower, upper):
    rows.append(row)
    lo.append(lower)
    hi.append(upper)

  for k in range(n_heads):  # exactly one rule per head
    add(sparse.coo_array((np.ones(n_rules), ([0] * n_rules, k * n_rules + np.arange(n_rules))),
                         shape=(1, nx + ny)), 1, 1)
  for i in range(n_len):  # mean density within [0.9, 1] x budget
    add(np.concatenate([np.tile(space.density_UxZ[i], n_heads) / n_heads, np.zeros(ny)])[None],
        0.9 * budget, budget)
    if caps is not None and np.isfinite(caps[i]):
      add(np.concatenate([space.loss_UxKxZ[i].ravel(), np.zeros(ny)])[None], -np.inf, caps[i])
  link = sparse.lil_array((nx, nx + ny))  # x[k, r] <= used[layer(k), r]
  for k in range(n_heads):
    for r in range(n_rules):
      link[k * n_rules + r, k * n_rules + r] = 1
      link[k * n_rules + r, nx + (k // per_layer) * n_rules + r] = -1
  add(link, -np.inf, 0)
  count = sparse.lil_array((space.num_layers, nx + ny))  # at most max_rules per layer
  for layer in range(space.num_layers):
    count[layer, nx + layer * n_rules:nx + (layer + 1) * n_rules] = 1
  add(count, -np.inf, max_rules)
  a = sparse.vstack([sparse.csr_array(r) for r in rows])
  lo = np.concatenate([np.broadcast_to(x, (r.shape[0],)) for x, r in zip(lo, rows)])
  hi = np.concatenate([np.broadcast_to(x, (r.shape[0],)) for x, r in zip(hi, rows)])
  res = optimize.milp(c, constraints=optimize.LinearConstraint(a, lo, hi),
                      integrality=np.ones(nx + ny), bounds=optimize.Bounds(0, 1),
                      options={"time_limit": time_limit})
  if res.x is None:
    return None
  return np.argmax(res.x[:nx].reshape(n_heads, n_rules), axis=1)


def candidates(space: SearchSpace, *, budget: float, max_rules: int = 2,
               epsilons: Sequence[float] = (0.1, 0.5)) -> list[np.ndarray]:
  """Pareto candidates: each length's optimum, then epsilon-constrained trade-offs."""
  n_len = len(space.lengths)
  found = []
  best = np.full(n_len, np.inf)
  for i in range(n_len):
    choice = solve(space, budget=budget, max_rules=max_rules, weights=np.eye(n_len)[i])
    if choice is None:
      raise infeasible(budget)
    found.append(choice)
    best[i] = loss_of(space, choice)[i]
  for i in range(n_len):
    for eps in epsilons if n_len > 1 else ():
      caps = np.where(np.arange(n_len) == i, np.inf, (1 + eps) * best)
      choice = solve(space, budget=budget, max_rules=max_rules, weights=np.eye(n_len)[i],
                     caps=caps)
      if choice is not None:
        found.append(choice)
  unique = {tuple(c): c for c in found}
  return list(unique.values())


def loss_of(space: SearchSpace, choice: np.ndarray) -> np.ndarray:
  """Profiled loss at each length of one rule per head."""
  return space.loss_UxKxZ[:, np.arange(len(choice)), choice].sum(axis=1)


def density_of(space: SearchSpace, choice: np.ndarray) -> np.ndarray:
  return space.density_UxZ[:, choice].mean(axis=1)


def to_plan(space: SearchSpace, choice: np.ndarray, num_heads: int) -> Plan:
  """Per query head (the authors' format): each head takes its KV head's rule."""
  kv_per_layer = len(choice) // space.num_layers
  g = num_heads // kv_per_layer
  rules_LxHx2 = np.repeat(space.rules[choice].reshape(space.num_layers, kv_per_layer, 2), g,
                          axis=1)
  return Plan(alphas=tuple(tuple(float(x) for x in r) for r in rules_LxHx2[..., 0]),
              betas=tuple(tuple(float(x) for x in r) for r in rules_LxHx2[..., 1]))
