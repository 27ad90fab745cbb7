"""A bias-free projection whose kernel is created under its logical axis names.

`nn.DenseGeneral` flattens multi-axis kernels internally, which makes its logical names fail to
apply under a mesh (flax#3676); contracting with `tensordot` keeps the kernel whole.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def contract(x: jax.Array, kernel: jax.Array, in_dims: int, dtype: jnp.dtype) -> jax.Array:
  """x's last `in_dims` axes against `kernel`'s first ones, both in `dtype`, summed in float32
  (the result's dtype): bfloat16 operands then run as native bfloat16 products."""
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if math.prod(x.shape[:x.ndim - in_dims]) == 1 and x.dtype != jnp.float32:
    # XLA:CPU runs a one-row product as a matrix-vector one, in float32 only, after converting
    # the whole kernel; two rows keep it a matrix product in `dtype`.
    return contract(jnp.concatenate([x, x]), kernel, in_dims, dtype)[:1]
  return jnp.tensordot(x, kernel, axes=in_dims, preferred_element_type=jnp.float32)


class Linear(nn.Module):
  """Contracts the last `in_dims` axes of x with the first `in_dims` axes of `kernel`."""

  kernel_shape: tuple[int, ...]
  axes: tuple[str, ...]  # logical name of every kernel axis
  in_dims: int = 1
  init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes)
    self.kernel = self.param("kernel", init, self.kernel_shape, self.param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return contract(x, self.kernel, self.in_dims, self.dtype).astype(self.dtype)
