"""MoA plans: one elastic rule per (layer, query head), span `S(N) = alpha + beta * N` tokens.

The file format is the authors' interchange JSON, exactly two keys, per query head:
`{"alphas": [[H floats] x L], "betas": [[H floats] x L]}`. A plan is applied at a request's
final length N (prompt + new tokens); every derived size below is a whole number of blocks.
GQA is native: a KV head's cache holds the largest span among its query heads, and each query
head reads only its own span of it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import numpy as np

from kvjax.config import ModelConfig
from kvjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Plan:
  alphas: tuple[tuple[float, ...], ...]  # L x H, tokens (may be negative)
  betas: tuple[tuple[float, ...], ...]  # L x H, fraction of N in [0, 1]

  @property
  def shape(self) -> tuple[int, int]:
    return len(self.alphas), len(self.alphas[0])

  def to_json(self) -> str:
    return json.dumps({"alphas": [list(r) for r in self.alphas],
                       "betas": [list(r) for r in self.betas]})

  def save(self, path: str | Path) -> None:
    Path(path).write_text(self.to_json())

  def cache_sizes(self, n: int, block: int) -> np.ndarray:
    """`[L, H]` slots per query head for final length `n` (sinks included): the span, at most
    `n`, at least two blocks, rounded up to whole blocks."""
    span = np.floor(np.asarray(self.alphas) + np.asarray(self.betas) * n).astype(np.int64)
    return cache_size(span, n, block)

  def kv_density(self, n: int, block: int, num_kv_heads: int) -> float:
    """Decode-cache slots over dense slots at final length `n`: each K/V head holds the largest
    size among its query heads."""
    sizes_LxH = self.cache_sizes(n, block)
    layers, heads = sizes_LxH.shape
    kv_LxK = sizes_LxH.reshape(layers, num_kv_heads, heads // num_kv_heads).max(axis=2)
    return float(kv_LxK.mean() / n)

  def check(self, cfg: ModelConfig, where: str = "model.moa.plan") -> None:
    """Raises ConfigError unless the plan has one rule per layer and query head of `cfg`."""
    layers, heads = self.shape
    _require(layers == cfg.num_layers, where,
             f"has rules for {layers} layers, the model has model.num_layers={cfg.num_layers}")
    _require(heads == cfg.num_heads, where,
             f"has rules for {heads} heads per layer, the model has model.num_heads="
             f"{cfg.num_heads} (rules are per query head, also for GQA models)")


def cache_size(span, n: int, block: int):
  """The decode cache formula: `ceil(max(min(span, n), 2 * block) / block) * block`."""
  return -(-np.maximum(np.minimum(span, n), 2 * block) // block) * block


def _require(cond: bool, where: str, allowed: str) -> None:
  if not cond:
    raise ConfigError(f"{where}: {allowed}")


def from_dict(data, where: str) -> Plan:
  """Validates the JSON structure and value ranges; `where` names the source in errors."""
  _require(isinstance(data, dict) and set(data) == {"alphas", "betas"}, where,
           f"must be a JSON object with exactly the keys 'alphas' and 'betas', got "
           f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
  rows = {}
  for key in ("alphas", "betas"):
    table = data[key]
    _require(isinstance(table, list) and table and all(isinstance(r, list) and r for r in table),
             where, f"{key} must be a non-empty list (layers) of non-empty lists (heads)")
    _require(len({len(r) for r in table}) == 1, where,
             f"{key} rows must all have the same number of heads, got {[len(r) for r in table]}")
    for i, row in enumerate(table):
      for j, x in enumerate(row):
        _require(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x),
                 where, f"{key}[{i}][{j}] must be a finite number, got {x!r}")
    rows[key] = tuple(tuple(float(x) for x in r) for r in table)
  _require(len(rows["alphas"]) == len(rows["betas"])
           and len(rows["alphas"][0]) == len(rows["betas"][0]), where,
           f"alphas ({len(rows['alphas'])} x {len(rows['alphas'][0])}) and betas "
           f"({len(rows['betas'])} x {len(rows['betas'][0])}) must have the same shape")
  for i, row in enumerate(rows["betas"]):
    for j, b in enumerate(row):
      _require(0.0 <= b <= 1.0, where, f"betas[{i}][{j}] must be in [0, 1], got {b}")
  return Plan(**rows)


def load_plan(path: str | Path) -> Plan:
  """Reads and validates a plan file (cached by path and modification time)."""
  path = Path(path)
  _require(path.is_file(), "model.moa.plan", f"no such file: {path}")
  return _load(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _load(path: str, mtime_ns: int) -> Plan:
  del mtime_ns  # part of the cache key only
  try:
    data = json.loads(Path(path).read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"model.moa.plan: {path} is not valid JSON: {e}") from None
  return from_dict(data, f"model.moa.plan: {path}")


def uniform_plan(num_layers: int, num_heads: int, alpha: float, beta: float) -> Plan:
  """The same rule for every head, e.g. the StreamingLLM baseline (alpha=0, beta=density)."""
  return Plan(alphas=((float(alpha),) * num_heads,) * num_layers,
              betas=((float(beta),) * num_heads,) * num_layers)
