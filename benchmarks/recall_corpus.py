"""The Attention-Gate benchmark's corpus: Shakespeare's plays mixed with multi-query associative
recall documents, whose continuation needs tokens far back (so that eviction can matter).

A recall document is `WINDOW` bytes, one line: pairs `%42 ` (a key, one of `KEYS`, bytes the
plays never use, and a two-digit value), prose filler, then queries (the pairs' keys again,
each followed by its value), then `end`. A held-out document has `PAIRS` pairs at its start and
its filler reaches byte `PREFIX`, so its `QUERIES` queries fill the last `WINDOW - PREFIX` bytes:
a cache that keeps only the recent part of the prefix has lost the values, a dense one can copy
them. A training document draws 1 to `PAIRS` pairs and a filler of any length up to that, with
queries filling the rest: with one pair, copying any value is right, and with the distance short
the copy is easy, a path a byte-level model takes within 4,000 CPU steps (the earlier corpus,
12 pairs `kd=21` always at least 120 bytes back, left a 6,000-step base at chance).

All recall documents go in one file that comes first in the corpus, so that every training window
of `WINDOW` tokens over it is one whole document.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from kvjax.data.corpus import split_documents

WINDOW = 256  # bytes per document, and the benchmark's window
PREFIX = 192  # bytes before the first held-out query: the context that is evicted
PAIRS = 8
KEYS = np.array(list("#%*+/<=>@^_`{|}~"))  # absent from the plays: a key is matched nowhere else
_PAIR = 4  # "%42 "
_END = "end\n"
QUERIES = (WINDOW - PREFIX - len(_END)) // _PAIR
_SPACE = re.compile(r"\s+")


def prose(texts: list[str]) -> str:
  """The texts as one line of ASCII prose (whitespace runs become one space), so that a
  document's bytes are its characters."""
  return _SPACE.sub(" ", " ".join(texts)).encode("ascii", "ignore").decode()


def recall_document(rng: np.random.Generator, filler: str, held_out: bool = True) -> str:
  """One document; `held_out=False` draws the pair count and the filler length (training)."""
  pairs = PAIRS if held_out else int(rng.integers(1, PAIRS + 1))
  keys = rng.choice(KEYS, pairs, replace=False)
  values = rng.integers(10, 100, pairs)
  head = "".join(f"{k}{v} " for k, v in zip(keys, values))
  room = PREFIX - len(head) - 1
  if not held_out:
    room = int(rng.integers(0, room + 1))
  start = int(rng.integers(0, len(filler) - room))
  asked = rng.choice(pairs, (WINDOW - len(_END) - len(head) - room - 1) // _PAIR)
  body = head + filler[start:start + room] + " " + "".join(f"{keys[i]}{values[i]} "
                                                          for i in asked)
  return body.ljust(WINDOW - len(_END)) + _END


def _query_offsets() -> np.ndarray:
  """Offsets within a held-out document of its queries' keys."""
  return PREFIX + np.arange(QUERIES) * _PAIR


def value_offsets() -> np.ndarray:
  """Offsets within a held-out document of the queried values' digits (what recall scores)."""
  first = _query_offsets() + 1
  return np.stack([first, first + 1], axis=1).reshape(-1)


def first_asks(tokens_WxT: np.ndarray) -> np.ndarray:
  """`[W, 2 * QUERIES]` over `value_offsets()`: the digits of a key's first query, whose value
  only the context holds (a repeated key's value also sits in the earlier query)."""
  keys_WxQ = tokens_WxT[:, _query_offsets()]
  asked_before_WxQ = np.tril(keys_WxQ[:, :, None] == keys_WxQ[:, None, :], -1).any(-1)
  return np.repeat(~asked_before_WxQ, 2, axis=1)


def recall_windows(n: int, filler: str, seed: int) -> np.ndarray:
  """`[n, WINDOW]` byte ids of `n` held-out recall documents."""
  rng = np.random.default_rng(seed)
  docs = [recall_document(rng, filler).encode("ascii") for _ in range(n)]
  return np.frombuffer(b"".join(docs), np.uint8).reshape(n, WINDOW).astype(np.int32)


def write_corpus(directory: Path, plays: list[str], num_recall: int, val_fraction: float,
                 seed: int = 0) -> Path:
  """`directory` with `0_recall.txt` (first in path order: the token stream starts with it) and
  the plays; the recall fillers come from the plays' training parts, so held-out prose never
  appears in training."""
  directory.mkdir(parents=True, exist_ok=True)
  filler = prose(split_documents(plays, val_fraction)[0])
  rng = np.random.default_rng(seed)
  (directory / "0_recall.txt").write_text("".join(recall_document(rng, filler, held_out=False)
                                                for _ in range(num_recall)))
  for i, play in enumerate(plays):
    (directory / f"play_{i:02d}.txt").write_text(play)
  return directory
