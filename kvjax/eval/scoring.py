"""Log-likelihoods of token spans: the one primitive behind perplexity, multiple choice and
teacher-forced recall.

A scorer is any `LogitsFn` (tokens_BxT -> logits_BxTxV). `forward_logits` uses the full forward
pass; `cached_logits` prefills through `kvjax.decode.init_cache` in chunks (`prefill_cache`, the
path a compressed cache takes before it decodes), so the same eval scores dense and compressed
variants.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig
from kvjax.decode import init_cache, prefill_cache

LogitsFn = Callable[[np.ndarray], jax.Array]


def forward_logits(model: nn.Module, params) -> LogitsFn:
  apply = jax.jit(lambda p, tokens_BxT: model.apply({"params": p}, tokens_BxT))
  return lambda tokens_BxT: apply(params, jnp.asarray(tokens_BxT, jnp.int32))


def cached_logits(model: nn.Module, params, cfg: ModelConfig, chunk: int = 256) -> LogitsFn:
  """Logits from prefill through the model's cache (as `decode.generate` builds it), `chunk`
  positions at a time."""
  def run(tokens_BxT):
    b, t = tokens_BxT.shape
    cache = init_cache(cfg, b, t)
    return prefill_cache(model, params, tokens_BxT, np.full(b, t), cache, chunk=chunk,
                         keep_logits=True)[2]

  return run


@jax.jit
def _token_scores(logits_BxTxV, tokens_BxT):
  """Log-probability of token t+1 given tokens <= t, and whether it is the argmax."""
  logits_BxTxV = logits_BxTxV[:, :-1].astype(jnp.float32)
  targets_BxT = tokens_BxT[:, 1:]
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  logp_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  greedy_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
  return logp_BxT, greedy_BxT


@dataclasses.dataclass(frozen=True)
class SpanScore:
  logprob: float  # sum over the span's tokens
  num_tokens: int
  greedy: bool  # every token of the span is the model's argmax given the true prefix


def _bucket(n: int, minimum: int = 32, step: int = 256) -> int:
  """Padded length: the next power of two up to `step`, then the next multiple of `step`, so few
  shapes compile and a long sequence is padded by less than `step`."""
  if n <= step:
    return max(minimum, 1 << (n - 1).bit_length())
  return -(-n // step) * step


def score_spans(logits_fn: LogitsFn, sequences: Sequence[np.ndarray],
                spans: Sequence[Sequence[tuple[int, int]]], *, pad_id: int = 0,
                batch_tokens: int = 4096, step: int = 256) -> list[list[SpanScore]]:
  """Scores token spans `[start, end)` (start >= 1) of every sequence.

  Sequences are sorted by length, right-padded to a few widths (`_bucket` with `step`) and
  batched up to `batch_tokens` tokens per call; padding never affects real tokens (causal
  attention).
  """
  order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
  results: list[list[SpanScore]] = [[] for _ in sequences]
  i = 0
  while i < len(order):
    width = _bucket(len(sequences[order[i]]), step=step)
    rows = max(1, batch_tokens // width)
    group = [j for j in order[i:i + rows] if len(sequences[j]) <= width]
    tokens_BxT = np.full((rows, width), pad_id, np.int32)  # fixed rows: one shape per width
    for r, j in enumerate(group):
      tokens_BxT[r, :len(sequences[j])] = sequences[j]
    logp_BxT, greedy_BxT = jax.device_get(_token_scores(logits_fn(tokens_BxT), tokens_BxT))
    for r, j in enumerate(group):
      for start, end in spans[j]:
        if not 1 <= start < end <= len(sequences[j]):
          raise ValueError(f"span [{start}, {end}) is not inside sequence {j} of length "
                           f"{len(sequences[j])} (spans start at >= 1: token 0 has no prediction)")
        results[j].append(SpanScore(float(logp_BxT[r, start - 1:end - 1].sum()), end - start,
                                    bool(greedy_BxT[r, start - 1:end - 1].all())))
    i += len(group)
  return results
