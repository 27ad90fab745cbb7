"""The method registry: the one table of KV-cache methods, and every decision that depends on
which of them a config turns on.

Adding a method is its own module(s) and one entry in `METHODS` (see `kvjax.method`). Which
methods combine follows from their declared capabilities: one method per role, the model kinds
each supports, and whether it can run with scanned layers; any other combination is one
`ConfigError` naming both keys and the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax

from kvjax.cache.dense import DenseLayout, dense_layout
from kvjax.cache.sequence import CausalLayout
from kvjax.cache.storage import PlainStorage, Storage
from kvjax.config import ModelConfig
from kvjax.errors import ConfigError
from kvjax.eviction.method import METHOD as EVICTION
from kvjax.gate.method import METHOD as ATTENTION_GATE
from kvjax.layers.cache import Layout
from kvjax.layers.kv_sharing import METHOD as CLA
from kvjax.method import Method
from kvjax.moa.method import METHOD as MOA
from kvjax.pallas_kernels.eligibility import Eligibility, eligibility
from kvjax.pallas_kernels.quantized import code_format
from kvjax.quant.method import METHOD as KV_QUANT

METHODS: tuple[Method, ...] = (CLA, MOA, ATTENTION_GATE, EVICTION, KV_QUANT)


def active(cfg: ModelConfig) -> tuple[Method, ...]:
  """The methods `cfg` turns on, in table order."""
  return tuple(m for m in METHODS if m.active(cfg))


def validate(cfg: ModelConfig) -> None:
  """Raises ConfigError unless every active method supports the model and the others."""
  methods = active(cfg)
  for i, m in enumerate(methods):
    for other in methods[:i]:
      if other.role == m.role:
        raise ConfigError(f"{m.key}: cannot be combined with {other.key}: both decide "
                          f"{m.role} (choose one)")
    if cfg.kind not in m.models:
      raise ConfigError(f"{m.key}: needs model.kind {' or '.join(repr(k) for k in m.models)}, "
                        f"got {cfg.kind!r}: {m.models_why}")
    if cfg.scan_layers and not m.scan:
      raise ConfigError(f"model.scan_layers: cannot be combined with {m.key}: {m.scan_why}")
    m.check(cfg)


def method_tag(cfg: ModelConfig) -> str:
  """What the cache is, in decode.py's report: model kind, attention sharing, methods."""
  if cfg.num_kv_heads == cfg.num_heads:
    heads = "mha"
  else:
    heads = "mqa" if cfg.num_kv_heads == 1 else f"gqa{cfg.num_heads // cfg.num_kv_heads}"
  return "/".join([cfg.kind, heads, *(m.tag(cfg) for m in active(cfg))])


def settings(cfg: ModelConfig) -> dict[str, dict]:
  """The config sections of the active methods, by method name (what a report records)."""
  return {m.name: dataclasses.asdict(getattr(cfg, m.section)) for m in active(cfg)}


def shards_kv_heads(cfg: ModelConfig) -> bool:
  """Whether the cache splits over K/V heads on a mesh (else over the batch only)."""
  return all(m.shards_kv_heads for m in active(cfg))


def is_added_param(cfg: ModelConfig, path: tuple[str, ...]) -> bool:
  """Whether a parameter path (flattened dict keys) belongs to what an active method adds to a
  base model (a base checkpoint does not hold it)."""
  for m in active(cfg):
    n = len(m.param_scope)
    if n and any(path[i:i + n] == m.param_scope for i in range(len(path) - n + 1)):
      return True
  return False


def kernel_eligibility(cfg: ModelConfig, platform: str | None = None) -> Eligibility:
  """Whether the decode kernel for `cfg`'s cache runs on `platform` (default: this backend)."""
  layout, block = next((m.kernel(cfg) for m in active(cfg) if m.kernel),
                       ("stacked" if cfg.scan_layers else "dense", None))
  rows = cfg.max_seq_len if block is None else -(-cfg.max_seq_len // block) * block
  entries, d = storage(cfg), cfg.head_dim_
  operand = jax.eval_shape(lambda: entries.kernel_operand(entries.zeros((1, 1, d))))
  return eligibility(platform or jax.default_backend(), layout, num_heads=cfg.num_heads,
                     num_kv_heads=cfg.num_kv_heads, head_dim=d, rows=rows, dtype=entries.dtype,
                     block_size=block, **code_format(operand, d))


def attention_choice(cfg: ModelConfig) -> tuple[str, str]:
  """`(impl, why)`: `model.attention_impl` resolved. `auto` is the Pallas kernels where they
  apply to `cfg`'s cache on this backend (`kernel_eligibility`), else the jnp reference."""
  if cfg.attention_impl != "auto":
    return cfg.attention_impl, f"model.attention_impl={cfg.attention_impl}"
  e = kernel_eligibility(cfg)
  return ("pallas", "auto: the kernel applies") if e.ok else ("xla", f"auto: {e.reason}")


def attention_impl(cfg: ModelConfig) -> str:
  return attention_choice(cfg)[0]


def storage(cfg: ModelConfig) -> Storage:
  """How the cache stores an entry: the active method's way, or `model.cache_dtype` values."""
  make = next((m.storage for m in active(cfg) if m.storage), None)
  return PlainStorage(cfg.cache_dtype) if make is None else make(cfg)


def dense_layouts(cfg: ModelConfig, batch: int, max_len: int, impl: str | None = None,
                  entries: Storage | None = None) -> tuple[DenseLayout, ...]:
  """One dense layout per K/V-producing layer (`impl` and `entries` default to `cfg`'s)."""
  impl, entries = impl or attention_impl(cfg), entries or storage(cfg)
  return tuple(dense_layout(batch, max_len, cfg.num_kv_heads, cfg.head_dim_, entries, impl)
               for _ in range(cfg.num_kv_layers))


def layouts(cfg: ModelConfig, batch: int, max_len: int) -> tuple[Layout, ...]:
  """The cache's layouts, one per K/V-producing layer: the active method's, or dense."""
  make = next((m.layouts for m in active(cfg) if m.layouts), dense_layouts)
  return make(cfg, batch, max_len, attention_impl(cfg), storage(cfg))


def sequence_layouts(cfg: ModelConfig) -> tuple[Layout, ...]:
  """Per layer, the layout of a whole sequence (training, scoring): the active method's, or
  causal attention within the sequence."""
  make = next((m.sequence_layouts for m in active(cfg) if m.sequence_layouts), None)
  return (CausalLayout(),) * cfg.num_layers if make is None else make(cfg)


def sequence_gap(cfg: ModelConfig) -> str | None:
  """Why scoring a whole sequence (forward, or prefill logits) would not show what `cfg`'s cache
  keeps, naming the method's key; None when it does."""
  return next((f"{m.key}: {why}" for m in active(cfg) if (why := m.sequence_why(cfg))), None)


def kv_filter(cfg: ModelConfig) -> Callable[..., nn.Module] | None:
  """The K/V filter submodule factory of the active method that has one."""
  make = next((m.kv_filter for m in active(cfg) if m.kv_filter), None)
  return None if make is None else make(cfg)
