"""The cache protocol: how attention meets its keys and values, whatever the method.

One layer's K/V live in a `Layout`. The attention layer `write`s the `Chunk` it projected (a
producer layer; a CLA consumer reads its producer's chunk and writes nothing), then `attend`s
through the layout, which may hold every token (dense), sinks and a ring of recent tokens (MoA),
the survivors of eviction (compacted), or nothing at all (a full-sequence layout for training and
scoring, which attends within the chunk). `attend` returns the layout too: a layout may learn
from the queries it serves (eviction scores keys by the attention they receive).

A model's `Cache` holds its layouts (`KVCache`: one per producer layer) and answers the hooks the
decode loop calls around a prompt. Every hook has a no-op default, so a layout implements only
what it needs:
- `with_prompt_lengths(lengths_B)`: prompts are right-padded; a layout that drops tokens must not
  keep pads in their place.
- `prefill_in_one_write`: the prompt must arrive in one write (the layout attends within the
  chunk it is given and keeps only part of it), so chunked prefill must not split it.
- `finish_prefill(room, rng)`: host side, once the prompt is in: a layout sized by what prefill
  kept shrinks to that plus `room` rows for the tokens still to come (compaction; `rng` for a
  random choice).
- `for_layer(layer)`: the view one reading layer has of a shared (CLA) layout, for layouts whose
  attention differs by layer (MoA windows); the model stores layouts back under their producer.
- `filter_state` / `with_filter_state`: where a K/V filter (an attention gate) keeps state of
  its own between steps.
"""

from __future__ import annotations

import abc
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


def tree_nbytes(tree) -> int:
  """Bytes held by every array (or ShapeDtypeStruct) leaf of a pytree."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@flax.struct.dataclass
class Chunk:
  """What a producer layer computed for the tokens at `positions`; its consumers reuse it."""

  k: jax.Array  # B x T x K x D, rotated keys
  v: jax.Array  # B x T x K x D
  positions: jax.Array  # B x T int32, consecutive per sequence
  # B x T x K: a K/V filter's flags, 0/1 in value (> 0.5: kept); their gradient is taken w.r.t.
  # the log of the filter's score (straight-through), as a shift of the key's attention logit.
  keep: jax.Array | None = None
  # B x T x K: the filter's ranking of the tokens (higher: kept first), for a layout that keeps a
  # fixed number of them after a dense prefill; no gradient.
  score: jax.Array | None = None


class Layout(abc.ABC):
  """One layer's K/V storage and the attention over it (subclasses: `flax.struct.dataclass`)."""

  prefill_in_one_write = False

  @abc.abstractmethod
  def write(self, chunk: Chunk) -> Layout:
    """Stores what the layout keeps of `chunk`."""

  @abc.abstractmethod
  def attend(self, q_BxTxHxD: jax.Array, chunk: Chunk) -> tuple[jax.Array, Layout]:
    """Attention of the chunk's queries (rotated, at `chunk.positions`) over what the layout
    holds, after `write`; returns the output `[B, T, H, D]` and the layout."""

  @property
  def nbytes(self) -> int:
    """Bytes the layout holds on its devices, as allocated."""
    return tree_nbytes(self)

  def with_prompt_lengths(self, prompt_lengths_B: jax.Array) -> Layout:  # noqa: ARG002
    """Default: a layout that keeps every written token keeps the pads harmlessly (the first
    decoded token of each sequence overwrites its first pad)."""
    return self

  def finish_prefill(self, room: int, rng: jax.Array) -> Layout:  # noqa: ARG002
    """Default: sized at creation for the whole request."""
    return self

  def for_layer(self, layer: int) -> Layout:  # noqa: ARG002
    """Default: the same attention for every layer that reads the layout."""
    return self

  @property
  def filter_state(self) -> Any:
    return None

  def with_filter_state(self, state: Any) -> Layout:  # noqa: ARG002
    """Default: no filter state is kept; the filter is handed None and returns None."""
    return self


class Cache(abc.ABC):
  """A model's cache: its layouts and whatever else the model carries between steps. Concrete
  caches are `flax.struct.dataclass`es with a static `max_len` (positions they hold)."""

  prefill_in_one_write = False

  @property
  def nbytes(self) -> int:
    return tree_nbytes(self)

  def with_prompt_lengths(self, prompt_lengths_B: jax.Array) -> Cache:  # noqa: ARG002
    return self

  def finish_prefill(self, room: int, rng: jax.Array) -> Cache:  # noqa: ARG002
    return self


@flax.struct.dataclass
class KVCache(Cache):
  """One layout per layer that owns K/V (CLA consumers read their producer's)."""

  layers: tuple
  max_len: int = flax.struct.field(pytree_node=False)

  @property
  def nbytes(self) -> int:
    return sum(layer.nbytes for layer in self.layers)

  @property
  def prefill_in_one_write(self) -> bool:
    return any(layer.prefill_in_one_write for layer in self.layers)

  def with_prompt_lengths(self, prompt_lengths_B: jax.Array) -> KVCache:
    # A copy per layer: one buffer in two leaves of a donated cache is rejected.
    return self.replace(layers=tuple(
        layer.with_prompt_lengths(jnp.array(prompt_lengths_B, jnp.int32, copy=True))
        for layer in self.layers))

  def finish_prefill(self, room: int, rng: jax.Array) -> KVCache:
    keys = jax.random.split(rng, len(self.layers))
    return self.replace(layers=tuple(layer.finish_prefill(room, key)
                                     for layer, key in zip(self.layers, keys)))
