"""What a model config's caches hand the decode kernels, as abstract calls: the cases that the
cross-lowering test and the TPU compile check run for every shipped config, so a new config is
covered without anyone listing it."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kvjax.pallas_kernels.block_sparse_decode import block_sparse_decode
from kvjax.pallas_kernels.eligibility import TABLE_BLOCK
from kvjax.pallas_kernels.quantized import QuantizedKV
from kvjax.pallas_kernels.shared_kv_decode import shared_kv_decode


class LayoutCase(NamedTuple):
  layout: str  # a name in `eligibility.LAYOUTS`
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rows: int  # slots per sequence
  block_size: int | None


def config_cases(cfg) -> list[LayoutCase]:
  """Every cache layout a `ModelConfig` can hand the kernels, at its `max_seq_len`."""
  if cfg.kind == "block_transformer":
    return [c for name in ("block_decoder", "token_decoder")
            for c in config_cases(cfg.decoder(name))]
  h, k, d, s = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim_, cfg.max_seq_len
  cases = [LayoutCase("dense", h, k, d, s, None),  # dense and CLA buffers, eviction's prefill
           LayoutCase("stacked", h, k, d, s, None)]  # scan_layers
  cases += [LayoutCase("flat", h, k, d, k * -(-s // block) * block, block)  # MoA plan, compacted
            for block in sorted({cfg.moa.block_size, TABLE_BLOCK})]
  gate = cfg.attention_gate
  if gate.enable:  # the gate's own dense cache
    cases.append(LayoutCase("dense", gate.num_heads, gate.num_heads, gate.head_dim, s, None))
  return cases


def _read_stack(q, k, v, lengths, index, **options):
  return shared_kv_decode(q, k, v, lengths, stack_index=index, **options)


def abstract_call(case: LayoutCase, dtype, backend: str, batch: int = 2, sharding=None,
                  quant: tuple[str, int] | None = None):
  """`(fn, args)`: the case's kernel call on `ShapeDtypeStruct`s, to lower or compile.

  quant: `(mode, values per scale)` for a quantized cache (its values in `dtype`).
  """
  sds = functools.partial(jax.ShapeDtypeStruct, sharding=sharding)
  layout, h, k, d, rows, block = case

  def kv(*shape):
    if quant is None:
      return sds(shape, dtype)
    mode, group = quant
    codes = sds((*shape[:-1], d // 2 if mode == "int4" else d),
                jnp.float8_e4m3fn if mode == "fp8" else jnp.int8)
    return QuantizedKV(codes, sds((*shape[:-1], d // (group or d)), jnp.bfloat16), mode)

  q = sds((batch, h, d), dtype)
  if layout == "flat":
    fn = functools.partial(block_sparse_decode, block_size=block, backend=backend,
                           interpret=False)
    return fn, (q, kv(batch, rows, d), kv(batch, rows, d),
                sds((batch, k, rows // k // block), jnp.int32), sds((batch, k), jnp.int32))
  lead = (3,) if layout == "stacked" else ()
  fn = functools.partial(_read_stack if lead else shared_kv_decode, backend=backend,
                         interpret=False)
  return fn, (q, kv(*lead, batch, rows, k, d), kv(*lead, batch, rows, k, d),
              sds((batch,), jnp.int32), *[sds((), jnp.int32)] * bool(lead))
