"""The one way prompts go into a cache: in one write or in chunks, then the decode loop's start.

Prompts are right-padded to a common width with their true lengths given separately; sequence
b's first generated token sits at position `prompt_lengths[b]`. The cache is told the lengths
first (a layout that drops tokens must not keep pads), then the prompt goes in `chunk` positions
at a time (attention memory grows as chunk x T rather than T x T), or whole when the cache needs
its prompt in one write (`Cache.prefill_in_one_write`). Layouts that score keys for eviction do
so from the queries they attend for, chunk by chunk. Once the prompt is in, the first new tokens
are sampled and the cache is finished for the tokens still to come (`Cache.finish_prefill`:
compaction, host side, since the sizes it chooses become static shapes).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from kvjax.decode.sampling import SamplingConfig, sample


@flax.struct.dataclass
class DecodeState:
  """What the decode loop carries."""

  tokens: jax.Array  # B x max_new, generated ids (pad after a sequence is done)
  last: jax.Array  # B, the token fed at the next step
  positions: jax.Array  # B, where `last` goes
  done: jax.Array  # B, bool
  step: jax.Array  # scalar, tokens generated so far
  rng: jax.Array
  cache: Any


@functools.partial(jax.jit, static_argnames=("model", "keep_logits"), donate_argnames=("cache",))
def _prefill_chunk(model: nn.Module, params, tokens_BxC: jax.Array, start: jax.Array,
                   lengths_B: jax.Array, cache, last_BxV: jax.Array, *, keep_logits: bool):
  """Positions `start .. start + C - 1` of every prompt into the cache; `last_BxV` takes the
  logits at each prompt's last token if it is in this chunk. Without `keep_logits` the LM head
  runs at that one position per sequence: no `[B, C, V]` is computed."""
  b, c = tokens_BxC.shape
  positions_BxC = start + jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
  cache = cache.with_prompt_lengths(lengths_B)
  at_B = lengths_B - 1 - start
  at_Bx1 = jnp.clip(at_B, 0, c - 1)[:, None]
  logits, cache = model.apply({"params": params}, tokens_BxC, positions=positions_BxC,
                              cache=cache, logits_at=None if keep_logits else at_Bx1)
  at_Bx1xV = jnp.take_along_axis(logits, at_Bx1[..., None], axis=1) if keep_logits else logits
  last_BxV = jnp.where(((at_B >= 0) & (at_B < c))[:, None], at_Bx1xV[:, 0], last_BxV)
  return (logits if keep_logits else None), cache, last_BxV


def prefill_cache(model: nn.Module, params, prompts_BxT, prompt_lengths_B, cache, *,
                  chunk: int | None = None, keep_logits: bool = False):
  """Writes the prompts into `cache` (donated): `(cache, last_logits_BxV, logits_BxTxV)`, the
  logits at each prompt's last token and, with `keep_logits`, at every position (scoring)."""
  prompts_BxT = jnp.asarray(prompts_BxT, jnp.int32)
  lengths_B = jnp.asarray(prompt_lengths_B, jnp.int32)
  b, t = prompts_BxT.shape
  width = t if chunk is None or cache.prefill_in_one_write else chunk
  last_BxV = jnp.zeros((b, model.cfg.vocab_size), jnp.float32)
  parts = []
  for start in range(0, t, width):
    logits_BxCxV, cache, last_BxV = _prefill_chunk(
        model, params, prompts_BxT[:, start:start + width], jnp.int32(start), lengths_B, cache,
        last_BxV, keep_logits=keep_logits)
    parts.append(logits_BxCxV)
  return cache, last_BxV, (jnp.concatenate(parts, axis=1) if keep_logits else None)


@functools.partial(jax.jit, static_argnames=("sampling", "max_new_tokens", "pad_id"),
                   donate_argnames=("cache",))
def start_decoding(last_logits_BxV, prompt_lengths_B, cache, rng, *, sampling: SamplingConfig,
                   max_new_tokens: int, pad_id: int = 0) -> DecodeState:
  """The loop's first state from the logits at each prompt's last token and the filled cache."""
  rng, key = jax.random.split(rng)
  first_B = sample(last_logits_BxV, key, sampling)
  tokens = jnp.full((first_B.shape[0], max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_B)
  return DecodeState(tokens=tokens, last=first_B,
                     positions=jnp.asarray(prompt_lengths_B, jnp.int32),
                     done=jnp.zeros(first_B.shape, bool), step=jnp.ones((), jnp.int32), rng=rng,
                     cache=cache)


def prefill(model: nn.Module, params, prompts_BxT, prompt_lengths_B, cache, rng, *,
            sampling: SamplingConfig, max_new_tokens: int, pad_id: int = 0,
            chunk: int | None = None) -> DecodeState:
  """Prompts into `cache` (donated), each sequence's first new token sampled, and the cache
  finished for the `max_new_tokens - 1` tokens still to be written: the decode loop's start."""
  cache, last_BxV, _ = prefill_cache(model, params, prompts_BxT, prompt_lengths_B, cache,
                                     chunk=chunk)
  state = start_decoding(last_BxV, prompt_lengths_B, cache, rng, sampling=sampling,
                         max_new_tokens=max_new_tokens, pad_id=pad_id)
  # A key of its own for a random choice of what to keep; the sampling stream is untouched.
  cache = state.cache.finish_prefill(max_new_tokens - 1, jax.random.fold_in(rng, 1))
  return state.replace(cache=cache)
