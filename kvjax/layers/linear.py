"""A bias-free projection whose kernel is created under its logical axis names.

`nn.DenseGeneral` flattens multi-axis kernels internally, which makes its logical names fail to
apply under a mesh (flax#3676); contracting with `tensordot` keeps the kernel whole.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Linear(nn.Module):
  """Contracts the last `in_dims` axes of x with the first `in_dims` axes of `kernel`."""

  kernel_shape: tuple[int, ...]
  axes: tuple[str, ...]  # logical name of every kernel axis
  in_dims: int = 1
  init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes)
    kernel = self.param("kernel", init, self.kernel_shape, self.param_dtype)
    return jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.in_dims)
