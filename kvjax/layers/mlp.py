"""SwiGLU feed-forward block."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from kvjax.layers.linear import Linear


class SwiGLU(nn.Module):
  mlp_dim: int
  init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _dense(self, shape, axes, name):
    return Linear(shape, axes, 1, self.init_std, self.dtype, self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x_BxTxE: jax.Array) -> jax.Array:
    d = x_BxTxE.shape[-1]
    gate_BxTxF = self._dense((d, self.mlp_dim), ("embed", "mlp"), "gate")(x_BxTxE)
    up_BxTxF = self._dense((d, self.mlp_dim), ("embed", "mlp"), "up")(x_BxTxE)
    h_BxTxF = nn.with_logical_constraint(nn.silu(gate_BxTxF) * up_BxTxF, ("batch", "length", "mlp"))
    return self._dense((self.mlp_dim, d), ("mlp", "embed"), "down")(h_BxTxF)
