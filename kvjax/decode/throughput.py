"""Throughput test: prefill and decode timed separately, cache bytes read off the cache itself."""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig
from kvjax.decode.cache import resolve_impl
from kvjax.decode.generate import after_prefill, decode_loop, decode_step, prefill
from kvjax.decode.sampling import SamplingConfig


def init_cache_for(cfg: ModelConfig, batch: int, max_len: int):
  from kvjax.decode import init_cache  # noqa: PLC0415 (the dispatching one)
  return init_cache(cfg, batch, max_len)


def param_count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(params)))


def attention_kind(cfg: ModelConfig) -> str:
  if cfg.num_kv_heads == cfg.num_heads:
    return "mha"
  return "mqa" if cfg.num_kv_heads == 1 else f"gqa{cfg.num_heads // cfg.num_kv_heads}"


def method_name(cfg: ModelConfig) -> str:
  """A short tag for what the cache is: model kind, attention sharing and compression method."""
  parts = [cfg.kind, attention_kind(cfg)]
  if cfg.num_kv_layers < cfg.num_layers:
    parts.append(f"cla[{cfg.num_kv_layers}of{cfg.num_layers}]")  # layers that own K/V
  if cfg.moa_plan:
    parts.append("moa")
  if cfg.attention_gate.enable:
    parts.append("gate")
  if cfg.eviction.policy != "none":
    parts.append(f"{cfg.eviction.policy}@{cfg.eviction.keep_ratio:g}")
  return "/".join(parts)


def _block(tree):
  return jax.block_until_ready(tree)


def measure(model: nn.Module, params, cfg: ModelConfig, *, batch: int, prompt_len: int,
            gen_len: int, seed: int = 0, sampling: SamplingConfig = SamplingConfig()) -> dict:
  """Times prefill of `batch` prompts of `prompt_len` random tokens, then `gen_len` new tokens.

  The first run compiles and is discarded; the second is timed. EOS is disabled so every
  sequence generates exactly `gen_len` tokens (`gen_len - 1` decode steps after prefill).
  """
  if gen_len < 2:
    raise ValueError(f"gen-len must be >= 2 to time decode steps, got {gen_len}")
  rng = jax.random.key(seed)
  prompts = jax.random.randint(rng, (batch, prompt_len), 0, min(cfg.vocab_size, 256), jnp.int32)
  lengths = jnp.full((batch,), prompt_len, jnp.int32)
  kw = dict(sampling=sampling, max_new_tokens=gen_len)

  def run():
    cache = init_cache_for(cfg, batch, prompt_len + gen_len)
    t0 = time.perf_counter()
    state = _block(after_prefill(prefill(model, params, prompts, lengths, cache, rng, **kw),
                                 gen_len))
    t1 = time.perf_counter()
    nbytes = state.cache.nbytes  # what decode holds (a compacted cache shrinks after prefill)
    state = _block(decode_loop(model, params, state, sampling=sampling))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, nbytes

  run()
  prefill_s, decode_s, nbytes = run()
  steps = gen_len - 1
  return {
      "method": method_name(cfg),
      "attention_impl": resolve_impl(cfg.attention_impl),
      "params": param_count(params),
      "batch": batch,
      "prompt_len": prompt_len,
      "gen_len": gen_len,
      "prefill_s": prefill_s,
      "decode_s": decode_s,
      "prefill_tokens_per_s": batch * prompt_len / prefill_s,
      "decode_tokens_per_s": batch * steps / decode_s,
      "ms_per_step": 1e3 * decode_s / steps,
      "kv_cache_bytes": nbytes,
      "kv_bytes_per_token": nbytes / (batch * (prompt_len + gen_len)),
      "device": jax.devices()[0].device_kind,
      "jax_version": jax.__version__,
  }


def time_bare_step(model: nn.Module, params, cfg: ModelConfig, *, batch: int, prompt_len: int,
                   steps: int) -> float:
  """Seconds per call of a bare jitted single-token forward on a cache of the same size."""
  step = jax.jit(lambda p, tok, pos, cache: decode_step(model, p, tok, pos, cache),
                 donate_argnums=(3,))
  cache = init_cache_for(cfg, batch, prompt_len + steps + 1)
  tok = jnp.zeros((batch,), jnp.int32)
  pos = jnp.full((batch,), prompt_len, jnp.int32)
  _, cache = _block(step(params, tok, pos, cache))
  t0 = time.perf_counter()
  for i in range(steps):
    logits, cache = step(params, tok, pos + i, cache)
  _block(logits)
  return (time.perf_counter() - t0) / steps
