"""Prefill, then one jitted `lax.while_loop` that carries the cache (donated) to the end.

Prompts are right-padded to a common length with their true lengths given separately;
sequence b's first generated token sits at position `prompt_lengths[b]`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.decode.eviction import apply_with_cache
from kvjax.decode.sampling import SamplingConfig, sample


@flax.struct.dataclass
class DecodeState:
  tokens: jax.Array  # B x max_new, generated ids (pad after a sequence is done)
  last: jax.Array  # B, the token fed at the next step
  positions: jax.Array  # B, where `last` goes
  done: jax.Array  # B, bool
  step: jax.Array  # scalar, tokens generated so far
  rng: jax.Array
  cache: Any


@flax.struct.dataclass
class GenerateOutput:
  tokens: jax.Array  # B x max_new
  lengths: jax.Array  # B, generated tokens per sequence, EOS included


def check_fits(prompt_len: int, max_new_tokens: int, cache_len: int) -> None:
  if prompt_len + max_new_tokens > cache_len:
    raise ValueError(
        f"prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} does not fit a "
        f"cache of {cache_len} positions; shorten the prompt, generate fewer tokens, or use a "
        f"larger cache (at most model.max_seq_len)")


def after_prefill(state: DecodeState, max_new_tokens: int) -> DecodeState:
  """Lets a cache sized by what prefill kept (`after_prefill(room)`, e.g. compacted survivors)
  shrink to that plus room for the tokens still to be written; other caches pass through.
  Host side: the new sizes are static shapes."""
  if hasattr(state.cache, "after_prefill"):
    return state.replace(cache=state.cache.after_prefill(max_new_tokens - 1))
  return state


def decode_step(model: nn.Module, params, tokens_B, positions_B, cache):
  """One token per sequence through the model; returns (logits_BxV, cache)."""
  logits_Bx1xV, cache = model.apply({"params": params}, tokens_B[:, None],
                                    positions=positions_B[:, None], cache=cache)
  return logits_Bx1xV[:, 0], cache


@functools.partial(jax.jit, static_argnames=("model", "sampling", "max_new_tokens", "pad_id"),
                   donate_argnames=("cache",))
def prefill(model: nn.Module, params, prompts_BxT, prompt_lengths_B, cache, rng, *,
            sampling: SamplingConfig, max_new_tokens: int, pad_id: int = 0) -> DecodeState:
  """Runs the prompts through the model and samples each sequence's first new token."""
  b, t = prompts_BxT.shape
  if hasattr(cache, "with_prompt_lengths"):  # a cache that drops tokens must not keep the pads
    cache = cache.with_prompt_lengths(prompt_lengths_B)
  if hasattr(model, "prefill"):  # a model whose cache layout depends on where each prompt ends
    logits_BxTxV, cache = model.apply({"params": params}, prompts_BxT, prompt_lengths_B, cache,
                                      method="prefill")
  else:
    positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits_BxTxV, cache = apply_with_cache(model, params, prompts_BxT, positions_BxT, cache)
  last_logits_BxV = jnp.take_along_axis(
      logits_BxTxV, (prompt_lengths_B - 1)[:, None, None], axis=1)[:, 0]
  return start_decoding(last_logits_BxV, prompt_lengths_B, cache, rng, sampling=sampling,
                        max_new_tokens=max_new_tokens, pad_id=pad_id)


def start_decoding(last_logits_BxV, prompt_lengths_B, cache, rng, *, sampling: SamplingConfig,
                   max_new_tokens: int, pad_id: int = 0) -> DecodeState:
  """The loop's first state from the logits at each prompt's last token and the filled cache,
  however the prompt went in (one prefill, or in chunks)."""
  rng, key = jax.random.split(rng)
  first_B = sample(last_logits_BxV, key, sampling)
  tokens = jnp.full((first_B.shape[0], max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_B)
  return DecodeState(tokens=tokens, last=first_B, positions=prompt_lengths_B.astype(jnp.int32),
                     done=jnp.zeros(first_B.shape, bool), step=jnp.ones((), jnp.int32), rng=rng,
                     cache=cache)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "eos_id", "pad_id"),
                   donate_argnames=("state",))
def decode_loop(model: nn.Module, params, state: DecodeState, *, sampling: SamplingConfig,
                eos_id: int | None = None, pad_id: int = 0) -> DecodeState:
  """Generates until every sequence hit EOS or `tokens` is full."""
  max_new = state.tokens.shape[1]

  def mark_eos(s: DecodeState) -> DecodeState:
    return s if eos_id is None else s.replace(done=s.done | (s.last == eos_id))

  def cond(s: DecodeState):
    return (s.step < max_new) & ~jnp.all(s.done)

  def body(s: DecodeState) -> DecodeState:
    logits_BxV, cache = decode_step(model, params, s.last, s.positions, s.cache)
    rng, key = jax.random.split(s.rng)
    next_B = jnp.where(s.done, pad_id, sample(logits_BxV, key, sampling))
    tokens = jax.lax.dynamic_update_slice(s.tokens, next_B[:, None], (0, s.step))
    return mark_eos(s.replace(tokens=tokens, last=next_B, positions=s.positions + 1,
                              step=s.step + 1, rng=rng, cache=cache))

  return jax.lax.while_loop(cond, body, mark_eos(state))


def output_of(state: DecodeState, eos_id: int | None) -> GenerateOutput:
  tokens = state.tokens
  n = tokens.shape[1]
  if eos_id is None:
    lengths = jnp.full((tokens.shape[0],), n, jnp.int32)
  else:
    is_eos = tokens == eos_id
    lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, n).astype(jnp.int32)
  return GenerateOutput(tokens=tokens, lengths=lengths)


def generate(model: nn.Module, params, prompts_BxT, prompt_lengths_B, *, max_new_tokens: int,
             rng: jax.Array, cache, sampling: SamplingConfig = SamplingConfig(),
             eos_id: int | None = None, pad_id: int = 0) -> GenerateOutput:
  """Samples `max_new_tokens` per prompt (fewer where EOS comes first).

  `cache` is a fresh cache from `kvjax.decode.init_cache`; it is donated (consumed).
  """
  prompt_lengths = np.asarray(prompt_lengths_B)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if prompt_lengths.min() < 1:
    raise ValueError("every prompt needs at least one token")
  if prompt_lengths.max() > prompts_BxT.shape[1]:
    raise ValueError(f"a prompt length ({prompt_lengths.max()}) exceeds the padded prompt width "
                     f"({prompts_BxT.shape[1]})")
  if prompts_BxT.shape[1] > cache.max_len:
    raise ValueError(f"padded prompt width {prompts_BxT.shape[1]} exceeds the cache's "
                     f"{cache.max_len} positions")
  check_fits(int(prompt_lengths.max()), max_new_tokens, cache.max_len)
  state = prefill(model, params, jnp.asarray(prompts_BxT, jnp.int32),
                  jnp.asarray(prompt_lengths, jnp.int32), cache, rng, sampling=sampling,
                  max_new_tokens=max_new_tokens, pad_id=pad_id)
  state = after_prefill(state, max_new_tokens)
  state = decode_loop(model, params, state, sampling=sampling, eos_id=eos_id, pad_id=pad_id)
  return output_of(state, eos_id)
