"""Quantized K/V entries: each (token, K/V head)'s D values as codes and bfloat16 scales.

A group of `g` consecutive values (the whole head by default) shares one scale
`s = max|x| / QMAX`, rounded to bfloat16; the codes are `x / s` with that rounded scale,
rounded to the code type and clipped to +-QMAX, so dequantization `code * s` errs by at most half
a code step (int8, int4) or half a float8 ulp. Modes:
- int8: int8 codes in [-127, 127];
- fp8: float8 e4m3 codes in [-448, 448] (relative precision, so small values inside a
  group keep more of their digits than with int8);
- int4: codes in [-7, 7], two per byte: byte j of a head holds value j in its low nibble and
  value j + D/2 in its high nibble (two contiguous halves, so a kernel multiplies each half
  with its half of the query without interleaving).

With `rotate`, a head's values are quantized after a Walsh-Hadamard rotation
(`quantized.rotate`): an outlier channel then no longer sets its group's scale (K after RoPE has
a few large channels in every token), and the rotation is exactly undone where values are read.

Codes and scales are one buffer pytree (`Quantized`) whose leaves share the leading axes, so
every layout moves, slices and compacts rows of it unchanged. K arrives rotated (after RoPE):
the layouts store what attention reads.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from kvjax.cache.storage import Storage
from kvjax.pallas_kernels import quantized

QMAX = {"int8": 127.0, "fp8": 448.0, "int4": 7.0}
SCALE_DTYPE = jnp.bfloat16


@flax.struct.dataclass
class Quantized:
  codes: jax.Array  # [..., D] int8 or float8_e4m3fn; int4: [..., D/2] int8, two codes a byte
  scales: jax.Array  # [..., D/g] bfloat16, one per group of g values


def _pack_int4(codes_xD: jax.Array) -> jax.Array:
  """`[..., D]` int8 codes in [-8, 7] -> `[..., D/2]` bytes: low nibble value j, high j + D/2."""
  lo, hi = jnp.split(codes_xD, 2, axis=-1)
  return (lo & 0x0F) | (hi << 4)


def quantize(x_xD: jax.Array, mode: str, group: int = 0, rotated: bool = False) -> Quantized:
  """`[..., D]` values -> codes and one scale per `group` values (0: per D), of the values
  rotated first if `rotated`."""
  if rotated:
    x_xD = quantized.rotate(x_xD)
  d = x_xD.shape[-1]
  g = group or d
  x_xGxg = x_xD.astype(jnp.float32).reshape(*x_xD.shape[:-1], d // g, g)
  scales_xG = (jnp.max(jnp.abs(x_xGxg), axis=-1) / QMAX[mode]).astype(SCALE_DTYPE)
  s_xG = scales_xG.astype(jnp.float32)
  y_xGxg = jnp.clip(x_xGxg / jnp.where(s_xG > 0, s_xG, 1.0)[..., None], -QMAX[mode], QMAX[mode])
  y_xD = y_xGxg.reshape(x_xD.shape)
  if mode == "fp8":
    codes = y_xD.astype(jnp.float8_e4m3fn)
  else:
    codes = jnp.round(y_xD).astype(jnp.int8)
    if mode == "int4":
      codes = _pack_int4(codes)
  return Quantized(codes, scales_xG)


def dequantize(q: Quantized, mode: str, dtype=jnp.float32, rotated: bool = False) -> jax.Array:
  """Codes times their scales, `[..., D]` in `dtype` (the kernels' own reading of the format)."""
  return quantized.dequantize(quantized.QuantizedKV(q.codes, q.scales, mode, rotated), dtype)


@dataclasses.dataclass(frozen=True)
class QuantStorage(Storage):
  """Entries as `Quantized` codes and scales; `read` dequantizes into `dtype`, a decode kernel
  reads the codes and scales themselves."""

  mode: str  # int8 | fp8 | int4
  group: int = 0  # values per scale; 0: the whole head
  dtype: str = "float32"
  rotate: bool = False  # codes of the values' Walsh-Hadamard rotation

  def zeros(self, shape: tuple[int, ...]) -> Quantized:
    *lead, d = shape
    code_dtype = jnp.float8_e4m3fn if self.mode == "fp8" else jnp.int8
    width = d // 2 if self.mode == "int4" else d
    return Quantized(jnp.zeros((*lead, width), code_dtype),
                     jnp.zeros((*lead, d // (self.group or d)), SCALE_DTYPE))

  def put(self, buf: Quantized, index: tuple, values: jax.Array) -> Quantized:
    new = quantize(values, self.mode, self.group, self.rotate)
    return jax.tree.map(lambda old, x: old.at[index].set(x, mode="drop"), buf, new)

  def read(self, buf: Quantized) -> jax.Array:
    return dequantize(buf, self.mode, self.dtype, self.rotate)

  def kernel_operand(self, buf: Quantized) -> quantized.QuantizedKV:
    return quantized.QuantizedKV(buf.codes, buf.scales, self.mode, self.rotate)
