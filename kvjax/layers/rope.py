"""Rotary position embedding in the half-split layout (HF Llama's `rotate_half`)."""

import jax
import jax.numpy as jnp


def apply_rope(x_BxTxNxD: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotates pairs (i, i + D/2) of every head by angle position * theta^(-2i/D)."""
  d = x_BxTxNxD.shape[-1]
  inv_freq_F = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  angle_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_F
  sin = jnp.sin(angle_BxTxF)[:, :, None, :]
  cos = jnp.cos(angle_BxTxF)[:, :, None, :]
  x = x_BxTxNxD.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxD.dtype)
