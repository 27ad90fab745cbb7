"""SwiGLU feed-forward block."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class SwiGLU(nn.Module):
  mlp_dim: int
  init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _dense(self, features, axes, name):
    init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), axes)
    return nn.Dense(features, use_bias=False, kernel_init=init, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x_BxTxE: jax.Array) -> jax.Array:
    d = x_BxTxE.shape[-1]
    gate_BxTxF = self._dense(self.mlp_dim, ("embed", "mlp"), "gate")(x_BxTxE)
    up_BxTxF = self._dense(self.mlp_dim, ("embed", "mlp"), "up")(x_BxTxE)
    h_BxTxF = nn.with_logical_constraint(nn.silu(gate_BxTxF) * up_BxTxF, ("batch", "length", "mlp"))
    return self._dense(d, ("mlp", "embed"), "down")(h_BxTxF)
