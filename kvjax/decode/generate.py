"""Prefill (`kvjax.decode.prefill`), then one jitted `lax.while_loop` that carries the cache
(donated) to the end."""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.decode.prefill import DecodeState, prefill
from kvjax.decode.sampling import SamplingConfig, sample


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


def decode_step(model: nn.Module, params, tokens_B, positions_B, cache):
  """One token per sequence through the model; returns (logits_BxV, cache)."""
  logits_Bx1xV, cache = model.apply({"params": params}, tokens_B[:, None],
                                    positions=positions_B[:, None], cache=cache)
  return logits_Bx1xV[:, 0], cache


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
             eos_id: int | None = None, pad_id: int = 0,
             chunk: int | None = None) -> GenerateOutput:
  """Samples `max_new_tokens` per prompt (fewer where EOS comes first).

  `cache` is a fresh cache from `kvjax.decode.init_cache`; it is donated (consumed). `chunk`
  prefills long prompts that many positions at a time.
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
  state = prefill(model, params, prompts_BxT, prompt_lengths, cache, rng, sampling=sampling,
                  max_new_tokens=max_new_tokens, pad_id=pad_id, chunk=chunk)
  state = decode_loop(model, params, state, sampling=sampling, eos_id=eos_id, pad_id=pad_id)
  return output_of(state, eos_id)
