"""The Attention-Gate benchmark's corpus: Shakespeare's plays mixed with key-value recall
documents, whose continuation needs tokens far back (so that eviction can matter).

A recall document is `WINDOW` bytes, one line:

  `PAIRS` pairs `ab=42 ` | prose filler up to byte `PREFIX` | `QUERIES` of the pairs again | `end`

The pairs open the document and the queries fill its last `WINDOW - PREFIX` bytes: a cache that
keeps only the recent part of the prefix has lost the values, a dense one can copy them. All
recall documents go in one file that comes first in the corpus, so that every training window of
`WINDOW` tokens over it is one whole document, with the pairs and their queries.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import numpy as np

from kvjax.data.corpus import split_documents

WINDOW = 256  # bytes per document, and the benchmark's window
PREFIX = 192  # bytes before the first query: the context that is evicted
PAIRS = 12
QUERIES = 10
_PAIR = 6  # "ab=42 "
_END = "end\n"
_KEYS = np.array([a + b for a in string.ascii_lowercase for b in string.ascii_lowercase])
_SPACE = re.compile(r"\s+")


def prose(texts: list[str]) -> str:
  """The texts as one line of ASCII prose (whitespace runs become one space), so that a
  document's bytes are its characters."""
  return _SPACE.sub(" ", " ".join(texts)).encode("ascii", "ignore").decode()


def recall_document(rng: np.random.Generator, filler: str) -> str:
  keys = rng.choice(_KEYS, PAIRS, replace=False)
  values = rng.integers(10, 100, PAIRS)
  pairs = "".join(f"{k}={v} " for k, v in zip(keys, values))
  room = PREFIX - len(pairs) - 1
  start = int(rng.integers(0, len(filler) - room))
  queries = "".join(f"{keys[i]}={values[i]} " for i in rng.choice(PAIRS, QUERIES, replace=False))
  return pairs + filler[start:start + room] + " " + queries + _END


def value_offsets() -> np.ndarray:
  """Offsets within a document of the queried values' digits (what recall is scored on)."""
  first = PREFIX + np.arange(QUERIES) * _PAIR + 3
  return np.stack([first, first + 1], axis=1).reshape(-1)


def recall_windows(n: int, filler: str, seed: int) -> np.ndarray:
  """`[n, WINDOW]` byte ids of `n` recall documents."""
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
  (directory / "0_recall.txt").write_text("".join(recall_document(rng, filler)
                                                for _ in range(num_recall)))
  for i, play in enumerate(plays):
    (directory / f"play_{i:02d}.txt").write_text(play)
  return directory
