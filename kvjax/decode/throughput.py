"""Throughput test: prefill and decode timed separately, cache bytes read off the cache itself.

On a mesh (the config's `mesh` section, as decode.py builds it) the prompts and the cache are
placed by `kvjax.sharding` (batch over `data` x `fsdp`, K/V heads over `tensor` where the
cache's layout allows) and the report adds what one device holds.
"""

from __future__ import annotations

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kvjax import registry, sharding
from kvjax.config import ModelConfig
from kvjax.decode.generate import decode_loop, decode_step
from kvjax.decode.prefill import DecodeState, prefill
from kvjax.decode.sampling import SamplingConfig
from kvjax.models import init_cache


def param_count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(params)))


def placed_cache(cfg: ModelConfig, batch: int, max_len: int, mesh: jax.sharding.Mesh | None):
  """A fresh cache; on a mesh, created already sharded (no device holds a full copy)."""
  init = lambda: init_cache(cfg, batch, max_len)
  if mesh is None:
    return init()
  return sharding.create_sharded(init, sharding.cache_shardings(jax.eval_shape(init), mesh))


@dataclasses.dataclass(frozen=True)
class Timed:
  """One timed generation: prefill and decode seconds, the loop's final state (its `tokens`),
  and the cache decode held."""

  prefill_s: float
  decode_s: float
  state: DecodeState
  kv_cache_bytes: int
  kv_cache_bytes_per_device: int


def timed_generation(model: nn.Module, params, cfg: ModelConfig, prompts_BxT: jax.Array, *,
                     gen_len: int, seed: int = 0, sampling: SamplingConfig = SamplingConfig(),
                     mesh: jax.sharding.Mesh | None = None) -> Timed:
  """Prefill of full-width prompts, then `gen_len - 1` decode steps (EOS disabled), each timed
  to completion on a fresh cache. The first call for a shape also compiles."""
  batch, prompt_len = prompts_BxT.shape
  lengths = jnp.full((batch,), prompt_len, jnp.int32)
  cache = placed_cache(cfg, batch, prompt_len + gen_len, mesh)
  t0 = time.perf_counter()
  state = jax.block_until_ready(prefill(model, params, prompts_BxT, lengths, cache,
                                        jax.random.key(seed), sampling=sampling,
                                        max_new_tokens=gen_len))
  t1 = time.perf_counter()
  cache = state.cache  # what decode holds (a compacted cache shrinks after prefill)
  nbytes, per_device = cache.nbytes, sharding.device_bytes(cache, jax.local_devices()[0])
  state = jax.block_until_ready(decode_loop(model, params, state, sampling=sampling))
  return Timed(t1 - t0, time.perf_counter() - t1, state, nbytes, per_device)


def measure(model: nn.Module, params, cfg: ModelConfig, *, batch: int, prompt_len: int,
            gen_len: int, seed: int = 0, sampling: SamplingConfig = SamplingConfig(),
            mesh: jax.sharding.Mesh | None = None) -> dict:
  """Times prefill of `batch` prompts of `prompt_len` random tokens, then `gen_len` new tokens.

  The first run compiles and is discarded; the second is timed. EOS is disabled so every
  sequence generates exactly `gen_len` tokens (`gen_len - 1` decode steps after prefill).
  With a `mesh`, `params` must be placed on it already (`sharding.logical_shardings`).
  """
  if gen_len < 2:
    raise ValueError(f"gen-len must be >= 2 to time decode steps, got {gen_len}")
  prompts = jax.random.randint(jax.random.key(seed), (batch, prompt_len), 0,
                               min(cfg.vocab_size, 256), jnp.int32)
  if mesh is not None:
    prompts = jax.device_put(prompts, sharding.batch_sharding(mesh, prompts.shape))
  kw = dict(gen_len=gen_len, seed=seed, sampling=sampling, mesh=mesh)
  timed_generation(model, params, cfg, prompts, **kw)
  run = timed_generation(model, params, cfg, prompts, **kw)
  steps = gen_len - 1
  impl, why = registry.attention_choice(cfg)
  return {
      "method": registry.method_tag(cfg),
      "methods": registry.settings(cfg),
      "attention_impl": impl,
      "attention_impl_why": why,
      "params": param_count(params),
      "batch": batch,
      "prompt_len": prompt_len,
      "gen_len": gen_len,
      "prefill_s": run.prefill_s,
      "decode_s": run.decode_s,
      "prefill_tokens_per_s": batch * prompt_len / run.prefill_s,
      "decode_tokens_per_s": batch * steps / run.decode_s,
      "ms_per_step": 1e3 * run.decode_s / steps,
      "kv_cache_bytes": run.kv_cache_bytes,
      "kv_bytes_per_token": run.kv_cache_bytes / (batch * (prompt_len + gen_len)),
      "mesh": dict(mesh.shape) if mesh is not None else None,
      "kv_cache_bytes_per_device": run.kv_cache_bytes_per_device,
      "cache_split": "batch, kv_heads" if registry.shards_kv_heads(cfg) else "batch",
      "device": jax.devices()[0].device_kind,
      "jax_version": jax.__version__,
  }


def time_bare_step(model: nn.Module, params, cfg: ModelConfig, *, batch: int, prompt_len: int,
                   steps: int) -> float:
  """Seconds per call of a bare jitted single-token forward on a cache of the same size."""
  step = jax.jit(lambda p, tok, pos, cache: decode_step(model, p, tok, pos, cache),
                 donate_argnums=(3,))
  cache = init_cache(cfg, batch, prompt_len + steps + 1)
  tok = jnp.zeros((batch,), jnp.int32)
  pos = jnp.full((batch,), prompt_len, jnp.int32)
  _, cache = jax.block_until_ready(step(params, tok, pos, cache))
  t0 = time.perf_counter()
  for i in range(steps):
    logits, cache = step(params, tok, pos + i, cache)
  jax.block_until_ready(logits)
  return (time.perf_counter() - t0) / steps
