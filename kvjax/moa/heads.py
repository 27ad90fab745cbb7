"""Retrieval heads: which heads read a planted span in dense attention, and a plan that keeps
them.

A retrieval prompt (`kvjax.eval.synthetic`: a pass key, numbered lines) plants its answer early
in a long context and asks for it. With the answer appended (teacher-forced), the heads that copy
it put much of their attention on the planted tokens while the answer is written; heads that do
not retrieve put almost none there. `SpanAttention` is a whole-sequence layout (causal attention)
that also returns that attention, so the model runs unchanged.

`keep_heads_plan` is the hand-written plan that tests MoA's mechanism apart from its search: the
K/V heads that serve the given query heads keep every token (a GQA group shares one cache), every
other head keeps its sink and one recent window, as long as the density budget allows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.layers.cache import Chunk, KVCache, Layout
from kvjax.moa.plan import Plan
from kvjax.moa.profile import causal_attention


@flax.struct.dataclass
class SpanAttention(Layout):
  """Causal attention within a whole sequence; `attend` also fills `mass_BxH`: per query head,
  the attention on the planted keys, averaged over the counted queries."""

  keys_BxS: jax.Array  # 1.0 at the planted tokens
  queries_BxT: jax.Array  # 1.0 at the query positions that count
  mass_BxH: jax.Array

  def write(self, chunk: Chunk) -> SpanAttention:  # noqa: ARG002 (attention reads the chunk)
    return self

  def attend(self, q_BxTxHxD: jax.Array, chunk: Chunk) -> tuple[jax.Array, SpanAttention]:
    out_BxTxHxD, probs_BxKxGxTxS = causal_attention(q_BxTxHxD, chunk.k, chunk.v)
    on_span_BxKxGxT = jnp.einsum("bkgts,bs->bkgt", probs_BxKxGxTxS, self.keys_BxS)
    mass_BxKxG = jnp.einsum("bkgt,bt->bkg", on_span_BxKxGxT, self.queries_BxT) / jnp.maximum(
        jnp.sum(self.queries_BxT, axis=1), 1.0)[:, None, None]
    return out_BxTxHxD, self.replace(mass_BxH=mass_BxKxG.reshape(self.mass_BxH.shape))


@functools.partial(jax.jit, static_argnames=("model",))
def span_attention(model, params, tokens_BxT, keys_BxT, queries_BxT) -> jax.Array:
  """`[L, B, H]`: each layer's and query head's attention from the counted queries to the
  planted keys, in the dense model."""
  cfg = model.cfg
  b, t = tokens_BxT.shape
  keys, queries = keys_BxT.astype(jnp.float32), queries_BxT.astype(jnp.float32)
  cache = KVCache(layers=tuple(SpanAttention(keys, queries, jnp.zeros((b, cfg.num_heads)))
                               for _ in range(cfg.num_layers)), max_len=t)
  positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  _, cache = model.apply({"params": params}, tokens_BxT, positions=positions_BxT, cache=cache)
  return jnp.stack([layer.mass_BxH for layer in cache.layers])


def planted_span(sequence: np.ndarray, answer: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """`(keys_T, queries_T)` of a prompt followed by its answer at `answer = (start, end)`: the
  prompt's occurrences of the answer's tokens (its leading tokens dropped until it occurs, e.g. a
  space the prompt spells differently), and the positions that predict the answer."""
  start, end = answer
  keys = np.zeros(len(sequence), bool)
  for first in range(start, end):
    target = sequence[first:end]
    hits = [i for i in range(start - len(target) + 1)
            if np.array_equal(sequence[i:i + len(target)], target)]
    if hits:
      for i in hits:
        keys[i:i + len(target)] = True
      break
  else:
    raise ValueError("no token of the answer occurs in the prompt: nothing is planted")
  queries = np.zeros(len(sequence), bool)
  queries[start - 1:end - 1] = True
  return keys, queries


def ranked(mass_LxH: np.ndarray) -> list[dict]:
  """Every (layer, query head) by attention on the planted span, highest first."""
  order = np.argsort(-mass_LxH, axis=None, kind="stable")
  layers, heads = np.unravel_index(order, mass_LxH.shape)
  return [{"layer": int(i), "head": int(h), "mass": float(mass_LxH[i, h])}
          for i, h in zip(layers, heads)]


def keep_heads_plan(keep: Sequence[tuple[int, int]], *, num_layers: int, num_heads: int,
                    num_kv_heads: int, budget: float, lengths: Sequence[int],
                    block: int) -> Plan:
  """Full span (alpha 0, beta 1) for every query head whose K/V head serves a `(layer, query
  head)` in `keep`; one window `beta * N` for the rest, the largest on a 1/256 grid whose KV
  density is at most `budget` at every length. Raises ValueError when the kept heads alone
  exceed the budget."""
  g = num_heads // num_kv_heads
  full_LxK = np.zeros((num_layers, num_kv_heads), bool)
  for layer, head in keep:
    full_LxK[layer, head // g] = True
  full_LxH = np.repeat(full_LxK, g, axis=1)
  alphas = tuple((0.0,) * num_heads for _ in range(num_layers))
  for beta in np.arange(np.floor(budget * 256), 0, -1) / 256:
    betas_LxH = np.where(full_LxH, 1.0, beta)
    plan = Plan(alphas=alphas, betas=tuple(tuple(float(b) for b in row) for row in betas_LxH))
    if all(plan.kv_density(n, block, num_kv_heads) <= budget for n in lengths):
      return plan
  raise ValueError(f"{int(full_LxK.sum())} full K/V heads of {full_LxK.size} leave no window "
                   f"within density {budget}")
