"""Token streams and the grain pipelines that cut them into `[batch, seq_len + 1]` windows.

A window holds `seq_len` inputs and, shifted by one, their targets. Training windows are
shuffled by `data.seed` (differently every epoch) and read through a grain iterator whose state
is saved with each checkpoint. Each process reads every `process_count`-th window of the one
global order, so all processes together see exactly the windows a single process would.
"""

from __future__ import annotations

import dataclasses

import absl.flags
import grain
import jax
import numpy as np

from kvjax.config import Config
from kvjax.data.corpus import load_documents, split_documents
from kvjax.data.tokenizers import Tokenizer
from kvjax.errors import ConfigError


def token_stream(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
  """All documents as one int32 stream, each followed by EOS so the model sees where it ends."""
  eos = np.array([tokenizer.eos_id], np.int32)
  return np.concatenate([np.zeros(0, np.int32)]
                        + [part for d in docs for part in (tokenizer.encode(d), eos)])


class TokenWindows:
  """Random-access source: window i is `tokens[i * seq_len : (i + 1) * seq_len + 1]`."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self.tokens = tokens
    self.seq_len = seq_len

  def __len__(self) -> int:
    return max(len(self.tokens) - 1, 0) // self.seq_len

  def __getitem__(self, i: int) -> np.ndarray:
    start = i * self.seq_len
    return self.tokens[start:start + self.seq_len + 1]


def per_process_batch(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ConfigError(f"train.batch_size: must be divisible by the number of processes "
                      f"({process_count}), got {global_batch}")
  return global_batch // process_count


def train_iterator(tokens: np.ndarray, seq_len: int, global_batch: int, seed: int, *,
                   worker_count: int = 0, process_index: int | None = None,
                   process_count: int | None = None) -> grain.DatasetIterator:
  """Endless shuffled batches of this process's windows; `get_state`/`set_state` resume it."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  windows = TokenWindows(tokens, seq_len)
  if len(windows) < global_batch:
    raise ConfigError(f"the training split holds {len(windows)} windows of data.seq_len+1="
                      f"{seq_len + 1} tokens, fewer than train.batch_size={global_batch}; "
                      f"use more text, a shorter data.seq_len or a smaller train.batch_size")
  ds = grain.MapDataset.source(windows).shuffle(seed).repeat()
  ds = ds[index::count].batch(per_process_batch(global_batch, count), drop_remainder=True)
  it = ds.to_iter_dataset()
  if worker_count:
    # grain's worker processes read absl flags, which only an absl app parses; defaults suffice.
    if not absl.flags.FLAGS.is_parsed():
      absl.flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it)


def validation_batches(tokens: np.ndarray, seq_len: int, global_batch: int, num_batches: int, *,
                       process_index: int | None = None,
                       process_count: int | None = None) -> list[np.ndarray]:
  """This process's share of up to `num_batches` fixed batches, spread evenly over the split."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  windows = TokenWindows(tokens, seq_len)
  num_batches = min(num_batches, len(windows) // global_batch)
  if num_batches == 0:
    raise ConfigError(f"the validation split holds {len(windows)} windows of data.seq_len+1="
                      f"{seq_len + 1} tokens, fewer than train.batch_size={global_batch}; "
                      f"raise data.val_fraction, use more text or shorten data.seq_len")
  n = num_batches * global_batch
  ds = grain.MapDataset.source(windows)[::len(windows) // n][:n]
  ds = ds[index::count].batch(per_process_batch(global_batch, count), drop_remainder=True)
  return list(ds)


@dataclasses.dataclass
class Data:
  tokenizer: Tokenizer
  train: grain.DatasetIterator
  val_batches: list[np.ndarray]


def make_data(cfg: Config) -> Data:
  """Reads `data.source`, splits and tokenizes it (with the checkpoint's own tokenizer when
  `model.weights` is set), and builds both pipelines."""
  from kvjax.io import tokenizer_for  # noqa: PLC0415 (kvjax.io is heavy; most runs need bytes)

  tokenizer = tokenizer_for(cfg)
  train_docs, val_docs = split_documents(load_documents(cfg.data.source), cfg.data.val_fraction)
  train_tokens = token_stream(train_docs, tokenizer)
  val_tokens = token_stream([d for d in val_docs if d], tokenizer)
  return Data(
      tokenizer=tokenizer,
      train=train_iterator(train_tokens, cfg.data.seq_len, cfg.train.batch_size, cfg.data.seed,
                           worker_count=cfg.data.worker_count),
      val_batches=validation_batches(val_tokens, cfg.data.seq_len, cfg.train.batch_size,
                                     cfg.train.eval_batches))
