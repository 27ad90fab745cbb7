"""How a cache stores each K/V entry: what a layout's buffers hold, and how values go in and out.

Layouts never touch their buffers' values directly: they allocate them with `zeros`, scatter new
entries with `put` and read values with `read`, or hand a decode kernel what it reads with
`kernel_operand` (a quantized buffer's codes and scales, dequantized inside the kernel: no float
copy of the cache is made for it). Buffers are pytrees whose leaves share the
leading axes (rows, heads) and differ only in the last, so a layout moves rows of any storage
with `jax.tree.map` (slicing, padding, concatenating when it compacts). `PlainStorage` keeps the
values in a float dtype; a method of the "how entries are stored" role (`kvjax.registry`)
supplies another (codes and scales, say), and every layout stores through it unchanged.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


class Storage(abc.ABC):
  """A frozen dataclass (static: part of a layout's pytree metadata)."""

  dtype: str  # what `read` returns: the values attention (and a decode kernel) computes with

  @abc.abstractmethod
  def zeros(self, shape: tuple[int, ...]) -> Any:
    """A buffer for entries of `shape` (the last axis: a head's D values)."""

  @abc.abstractmethod
  def put(self, buf: Any, index: tuple, values: jax.Array) -> Any:
    """`buf` with `values` (`[..., D]`) at `index` over its leading axes; an index past the
    end is dropped."""

  @abc.abstractmethod
  def read(self, buf: Any) -> jax.Array:
    """The values a buffer holds, `[..., D]`."""

  @abc.abstractmethod
  def kernel_operand(self, buf: Any) -> Any:
    """What a decode kernel (`kvjax.pallas_kernels`) reads for the buffer: values `[..., D]`
    in `dtype`, or a `QuantizedKV` of codes and scales; either keeps the leading axes."""


@dataclasses.dataclass(frozen=True)
class PlainStorage(Storage):
  """Values as they are, in `dtype`."""

  dtype: str = "float32"

  def zeros(self, shape: tuple[int, ...]) -> jax.Array:
    return jnp.zeros(shape, self.dtype)

  def put(self, buf: jax.Array, index: tuple, values: jax.Array) -> jax.Array:
    return buf.at[index].set(values.astype(buf.dtype), mode="drop")

  def read(self, buf: jax.Array) -> jax.Array:
    return buf

  def kernel_operand(self, buf: jax.Array) -> jax.Array:
    return buf
