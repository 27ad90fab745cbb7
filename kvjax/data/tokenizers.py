"""Tokenizers: byte-level (the default, needs no files) and GPT-2 BPE."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, then PAD, BOS, EOS."""

  pad_id: int = 256
  bos_id: int = 257
  eos_id: int = 258
  vocab_size: int = 259

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")


_VOCAB_SIZES = {"byte": ByteTokenizer.vocab_size, "gpt2": 50257}


def tokenizer_vocab_size(name: str) -> int:
  """Number of ids the named tokenizer can emit (the model's vocab must cover them)."""
  return _VOCAB_SIZES[name]


def get_tokenizer(name: str):
  if name == "byte":
    return ByteTokenizer()
  raise NotImplementedError(name)
