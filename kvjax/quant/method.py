"""Quantized entries' registry entry: `model.kv_quant.mode` stores every K/V entry of every
layout as codes and scales (`kvjax.quant.storage`); it combines with any method that decides
which tokens or which layers the cache keeps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.config import ModelConfig
from kvjax.errors import ConfigError
from kvjax.method import ENTRIES, Method
from kvjax.quant.storage import QuantStorage

# Code types a backend must convert to and from (int8 works everywhere).
CODE_DTYPES = {"fp8": "float8_e4m3fn"}


@functools.cache
def conversion_error(dtype: str, backend: str) -> str | None:
  """Why `backend` cannot convert float32 to `dtype` and back (None: it can), from one tiny
  compiled round trip."""
  try:
    x = jax.device_put(jnp.ones((2,), jnp.float32), jax.devices(backend)[0])
    jax.jit(lambda x: x.astype(dtype).astype(jnp.float32))(x).block_until_ready()
  except Exception as e:  # noqa: BLE001 (any failure means the dtype is not usable there)
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
  return None


def stored_head_dims(cfg: ModelConfig) -> dict[str, int]:
  """The head dimension of every kind of entry the cache stores, by the key that sets it."""
  if cfg.kind == "block_transformer":
    dims = {f"model.block.{name}.head_dim": cfg.decoder(name).head_dim_
            for name in ("block_decoder", "token_decoder")}
  else:
    dims = {"model.head_dim": cfg.head_dim_}
  if cfg.attention_gate.enable:  # the gate's own K/V are cached too
    dims["model.attention_gate.head_dim"] = cfg.attention_gate.head_dim
  return dims


def _check(cfg: ModelConfig) -> None:
  q = cfg.kv_quant
  # Head dimensions are even (RoPE), so int4's pairs of values always fill whole bytes.
  for key, d in stored_head_dims(cfg).items():
    if q.group_size and d % q.group_size:
      raise ConfigError(f"model.kv_quant.group_size: must divide {key}={d}, got {q.group_size}")
    if q.rotate and d & (d - 1):
      raise ConfigError(f"model.kv_quant.rotate: the Walsh-Hadamard rotation needs a power-of-two "
                        f"{key}, got {d}")
  if q.mode in CODE_DTYPES:
    backend = jax.default_backend()
    error = conversion_error(CODE_DTYPES[q.mode], backend)
    if error:
      raise ConfigError(f"model.kv_quant.mode: {q.mode} ({CODE_DTYPES[q.mode]}) is not "
                        f"supported on the {backend} backend ({error}); use int8 or int4")


METHOD = Method(
    name="kv_quant", section="kv_quant", key="model.kv_quant.mode", role=ENTRIES,
    active=lambda cfg: cfg.kv_quant.mode != "none",
    tag=lambda cfg: (cfg.kv_quant.mode
                     + (f"@g{cfg.kv_quant.group_size}" if cfg.kv_quant.group_size else "")
                     + ("+rot" if cfg.kv_quant.rotate else "")),
    models=("llama", "block_transformer"), scan=True, check=_check,
    sequence_why=lambda cfg: "a forward pass attends to the unquantized K/V it computes",
    storage=lambda cfg: QuantStorage(cfg.kv_quant.mode, cfg.kv_quant.group_size, cfg.dtype,
                                     cfg.kv_quant.rotate))
