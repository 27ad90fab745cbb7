"""Quantized K/V as the decode kernels read it: codes and scales, dequantized tile by tile in the
kernel, so a step reads the codes once and no float copy of the cache exists in HBM.

The code format, described here with plain data (the kernels know no cache method):
- `int8`: int8 codes, `fp8`: float8_e4m3fn codes, one per value (`[..., D]`);
- `int4`: `[..., D/2]` bytes, byte j holding value j in its low nibble and value j + D/2 in its
  high nibble (signed). The two nibbles are two contiguous halves of the head, so a kernel reads
  the head as two half-width parts and multiplies each with its half of the query: nothing is
  interleaved.
- scales: `[..., D/g]` floats, one per group of g consecutive values of the head (g = D / the
  scale count); a value is its code times its group's scale.
- `rotated`: the codes hold a head's values times `hadamard(D)`, an orthonormal symmetric matrix
  (its own inverse). Attention is the same in that basis, `q.k = (qH).(kH)` and
  `sum p v = (sum p vH) H`, so a kernel rotates its query once, attends over the codes as they
  are, and rotates its output back: the rotation costs O(D^2) per query, not per cached token.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("int8", "fp8", "int4")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKV:
  """K or V of a cache as codes and scales (leaves share the leading axes, like the values)."""

  codes: jax.Array  # [..., D] int8 or float8_e4m3fn; int4: [..., D/2] int8, two codes a byte
  scales: jax.Array  # [..., D/g]
  mode: str = dataclasses.field(metadata={"static": True})  # int8 | fp8 | int4
  rotated: bool = dataclasses.field(default=False, metadata={"static": True})

  @property
  def parts(self) -> int:
    """Column parts a head is read as: int4's two halves, else the whole head."""
    return 2 if self.mode == "int4" else 1

  @property
  def head_dim(self) -> int:
    return self.codes.shape[-1] * self.parts

  @property
  def shape(self) -> tuple[int, ...]:
    """The values' shape."""
    return (*self.codes.shape[:-1], self.head_dim)

  def map(self, fn) -> QuantizedKV:
    """`fn` applied to codes and scales alike (a view or gather of the values' leading axes)."""
    return QuantizedKV(fn(self.codes), fn(self.scales), self.mode, self.rotated)


@functools.cache
def hadamard(d: int) -> np.ndarray:
  """The `[d, d]` orthonormal Walsh-Hadamard matrix (Sylvester's; d a power of two)."""
  if d < 1 or d & (d - 1):
    raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, got {d}")
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < d:
    h = np.block([[h, h], [h, -h]])
  return h / np.sqrt(np.float32(d))


def rotate(x_xD: jax.Array) -> jax.Array:
  """`x @ hadamard(D)` in float32 at full precision (its own inverse)."""
  return jnp.matmul(x_xD.astype(jnp.float32), hadamard(x_xD.shape[-1]),
                    precision=jax.lax.Precision.HIGHEST)


def code_format(x, head_dim: int) -> dict:
  """How K/V handed to a kernel are stored, as `eligibility`'s keywords: `{}` for float values;
  for codes their mode and the values per scale (`group`, 0: one scale per head)."""
  if not isinstance(x, QuantizedKV):
    return {}
  groups = x.scales.shape[-1] * head_dim // x.shape[-1]
  return {"quant": x.mode, "group": 0 if groups == 1 else head_dim // groups}


def kv_map(fn, x):
  """`fn` on K/V values, or on a `QuantizedKV`'s codes and scales alike."""
  return x.map(fn) if isinstance(x, QuantizedKV) else fn(x)


def values(x, dtype) -> jax.Array:
  """K/V values: float values as they are, codes dequantized into `dtype` (for references)."""
  return dequantize(x, dtype) if isinstance(x, QuantizedKV) else x


def code_parts(codes, mode: str) -> list[jax.Array]:
  """Integer-valued code arrays, one per column part: int4 bytes unpacked into their low and
  high nibbles; integers widened to int32 (not every TPU has int8 vector arithmetic)."""
  if mode == "fp8":
    return [codes]
  wide = codes.astype(jnp.int32)
  return [(wide << 28) >> 28, wide >> 4] if mode == "int4" else [wide]


def dequantize(x: QuantizedKV, dtype) -> jax.Array:
  """The values, `[..., D]` in `dtype`: codes times their group's scale, in float32 (rotated
  back when the codes are rotated)."""
  codes = jnp.concatenate(code_parts(x.codes, x.mode), axis=-1).astype(jnp.float32)
  scales = x.scales.astype(jnp.float32)
  groups = scales.shape[-1]
  values = (codes.reshape(*codes.shape[:-1], groups, -1) * scales[..., None]).reshape(codes.shape)
  return (rotate(values) if x.rotated else values).astype(dtype)


def dequantize_tile(codes_SxW, scales, scale_index_1xW, dtype, *, by_dot: bool) -> jax.Array:
  """One part of a loaded K/V tile as values: `codes_SxW` (a `code_parts` part) times, per
  column, the scale at `scale_index_1xW` among the tile's scale columns.

  A single scale column is broadcast; several are spread over the columns by their one-hot
  selection matrix (gathers of a loaded tile lower on neither backend), exactly (one nonzero
  term per output): `by_dot`, an MXU product (Mosaic; Triton dots need every dimension
  >= 16), else a broadcast multiply + reduce (Triton, any size).
  """
  count = scales.shape[1]
  if count == 1:
    scale_SxW = jnp.broadcast_to(scales.astype(jnp.float32), codes_SxW.shape)
  elif by_dot:
    one_hot = jax.lax.broadcasted_iota(jnp.int32, (count, 1), 0) == scale_index_1xW
    precision = jax.lax.Precision.HIGHEST if scales.dtype == jnp.float32 else None
    scale_SxW = jax.lax.dot(scales, one_hot.astype(scales.dtype), precision=precision,
                            preferred_element_type=jnp.float32)
  else:
    one_hot = jax.lax.broadcasted_iota(jnp.int32, (1, count, 1), 1) == scale_index_1xW[None]
    scale_SxW = jnp.sum(jnp.where(one_hot, scales.astype(jnp.float32)[:, :, None], 0.0), axis=1)
  return (codes_SxW.astype(jnp.float32) * scale_SxW).astype(dtype)


def scale_index(width: int, head_width: int, part: int, group: int, groups_per_head: int):
  """`[1, width]` int32: the scale column (within the tile) of each code column of a part.

  Code column j belongs to head j // head_width of the tile and holds that head's value
  `j % head_width + part * head_width`, in group `value // group`.
  """
  j_1xW = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
  value_1xW = jax.lax.rem(j_1xW, head_width) + part * head_width
  return jax.lax.div(j_1xW, head_width) * groups_per_head + jax.lax.div(value_1xW, group)
